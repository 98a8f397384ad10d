"""`mtp report` on metrics files a person (or an attacker) edited: absurd MTP depths, lines
nested 100k deep, integers too large for a float, giant lines, a FIFO. Bounded in memory and
time: a warning naming the file and line, or exit 2, never a traceback."""

from __future__ import annotations

import json
import os

import pytest

from mtp_cli.report import build_report
from tests.hostile_helpers import assert_refused, run_bounded
from tests.report_helpers import write_run


def report(run_dir):
    return build_report([run_dir], plots=False)


def test_absurd_depth_key_is_ignored_with_a_warning(tmp_path):
    run = tmp_path / "run"
    write_run(run, depths=1, tail=json.dumps({"step": 51, "lm_loss": 2.0,
                                              "mtp_100000000_loss": 1.0}) + "\n")
    result = report(run)
    summary = result.runs[0].as_dict()
    assert summary["mtp_depths"] == 1
    assert set(summary["train"]) == {"lm_loss", "mtp_1_loss", "mtp_1_acceptance_rate",
                                     "mtp_1_cumulative_acceptance_rate"}
    assert result.warnings == [f"{run / 'metrics.jsonl'}:53: key 'mtp_100000000_loss': MTP "
                               "depth past 100; ignored"]


@pytest.mark.slow
def test_absurd_depth_through_the_cli_is_bounded(tmp_path):
    run = tmp_path / "run"
    write_run(run, depths=1, tail=json.dumps({"step": 51, "mtp_100000000_loss": 1.0}) + "\n")
    outcome = run_bounded("report", str(run), "--out", str(tmp_path / "plots"))
    assert outcome.returncode == 0, outcome.stderr
    assert f"{run / 'metrics.jsonl'}:53: key 'mtp_100000000_loss'" in outcome.stderr
    assert "Traceback" not in outcome.stderr


def test_deeply_nested_line_is_skipped(tmp_path):
    run = tmp_path / "run"
    deep = '{"step": 51, "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    write_run(run, depths=0, tail=deep + "\n")
    result = report(run)
    assert result.warnings == [f"{run / 'metrics.jsonl'}:53: nested too deeply; skipped"]
    assert result.runs[0].as_dict()["lines"]["broken"] == [53]


@pytest.mark.slow
def test_only_a_deeply_nested_line_exits_2(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    outcome = run_bounded("report", str(run))
    assert_refused(outcome, f"{run / 'metrics.jsonl'}: no complete metrics lines")


def test_integers_too_large_for_a_float_are_dropped(tmp_path):
    run = tmp_path / "run"
    train = write_run(run, depths=0)
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 51, "lm_loss": ' + "1" + "0" * 400 + ', "tokens_per_s": 5.0}\n')
        handle.write('{"step": 52, "lm_loss": 2.5, "tokens_per_s": ' + "9" * 5000 + "}\n")
    result = report(run)
    path = run / "metrics.jsonl"
    assert result.warnings == [
        f"{path}:53: 'lm_loss': integer too large for a float; ignored",
        f"{path}:54: 'tokens_per_s': integer too large for a float; ignored"]
    summary = result.runs[0].as_dict()
    assert summary["train"]["lm_loss"]["last"] == 2.5
    assert summary["train"]["lm_loss"]["first"] == train[0]["lm_loss"]


def test_giant_line_is_skipped_unread(tmp_path):
    run = tmp_path / "run"
    write_run(run, depths=0, tail='{"step": 51, "note": "' + "x" * (3 << 20) + '"}\n'
              + json.dumps({"step": 52, "lm_loss": 2.0}) + "\n")
    result = report(run)
    assert result.warnings == [f"{run / 'metrics.jsonl'}:53: longer than 1,048,576 bytes; "
                               "skipped"]
    assert result.runs[0].as_dict()["steps"] == 52


def test_warnings_are_capped(tmp_path):
    run = tmp_path / "run"
    write_run(run, depths=0, tail="garbage\n" * 1000)
    warnings = report(run).warnings
    assert len(warnings) == 21 and warnings[-1].endswith(": 980 more warnings")


def test_a_fifo_is_refused_unopened(tmp_path):
    from mtp_cli.errors import UserError

    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / "metrics.jsonl")
    with pytest.raises(UserError, match="not a regular file"):
        report(run)


@pytest.mark.slow
def test_a_fifo_is_not_read(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / "metrics.jsonl")
    outcome = run_bounded("report", str(run), timeout=60)
    assert_refused(outcome, f"{run / 'metrics.jsonl'}: not a regular file")


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_dropped(tmp_path, value):
    run = tmp_path / "run"
    write_run(run, depths=0, tail=f'{{"step": 51, "lm_loss": {value}}}\n')
    result = report(run)
    assert result.warnings == [f"{run / 'metrics.jsonl'}:53: 'lm_loss': not a finite number; "
                               "ignored"]
