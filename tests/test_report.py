"""`mtp report`: per-run tables from metrics.jsonl (CONTRACTS.md section 3), comparison, plots.

The metrics files here are written by the test with known values, so every statistic is checked
against a plain-Python computation over the numbers written.
"""

from __future__ import annotations

import json

import pytest
from matplotlib.image import imread

from mtp_cli.report import build_report
from tests.inspect_fixtures import invoke
from tests.report_helpers import STEPS, TOKENS_PER_STEP, write_run


@pytest.fixture
def two_runs(tmp_path):
    d0 = write_run(tmp_path / "d0", depths=0)
    d1 = write_run(tmp_path / "d1", depths=1, offset=-0.04)
    return tmp_path, d0, d1


def _stats(values: list[float]) -> dict[str, float]:
    tail = values[-5:]  # 10% of 50 steps
    return {"first": values[0], "last": values[-1], "min": min(values),
            "mean_last_10pct": sum(tail) / 5}


def test_tables_match_the_numbers_written(two_runs):
    root, d0, d1 = two_runs
    code = invoke("report", root / "d0", root / "d1", "--out", root / "plots", "--json")
    assert code.exit_code == 0, code.output
    out = json.loads(code.stdout)
    run0, run1 = out["runs"]
    assert (run0["mtp_depths"], run1["mtp_depths"]) == (0, 1)
    assert run0["label"] == "d0 (D=0)" and run1["label"] == "d1 (D=1)"
    assert run1["steps"] == STEPS and run1["tokens"] == STEPS * TOKENS_PER_STEP
    for key in ("lm_loss", "mtp_1_loss", "mtp_1_acceptance_rate",
                "mtp_1_cumulative_acceptance_rate"):
        expected = _stats([line[key] for line in d1])
        assert run1["train"][key] == pytest.approx(expected, rel=1e-12), key
    assert set(run0["train"]) == {"lm_loss"}
    val = run1["validation"]["val_mtp_1_loss"]
    assert val["first"] == pytest.approx(d1[24]["mtp_1_loss"] + 0.1)
    assert val["last"] == pytest.approx(d1[49]["mtp_1_loss"] + 0.1)
    speed = run1["throughput"]
    assert speed["tokens_per_s_mean_last_10pct"] == pytest.approx(1000 + (46 + 50) / 2)
    assert speed["peak_memory_mb"] == 106.0
    assert run1["lines"] == {"train": 50, "val": 2, "broken": []}
    comparison = out["comparison"][0]
    delta = _stats([x["lm_loss"] for x in d1])["mean_last_10pct"] - \
        _stats([x["lm_loss"] for x in d0])["mean_last_10pct"]
    assert comparison["lm_loss_mean_last_10pct_delta"] == pytest.approx(delta)
    assert comparison["lm_loss_mean_last_10pct_delta"] == pytest.approx(-0.04)
    assert comparison["val_lm_loss_last_delta"] == pytest.approx(-0.04)


def test_plots_are_written_and_named(two_runs):
    root, _, _ = two_runs
    result = invoke("report", root / "d0", root / "d1", "--out", root / "plots")
    assert result.exit_code == 0, result.output
    names = ["report_loss_vs_steps.png", "report_loss_vs_tokens.png",
             "report_acceptance_vs_steps.png"]
    for name in names:
        path = root / "plots" / name
        assert f"wrote {path}" in result.stdout
        image = imread(path)
        assert image.shape[0] > 200 and image.shape[1] > 400
        assert image.std() > 0.01  # not a blank canvas
    assert sorted(p.name for p in (root / "plots").iterdir()) == sorted(names)
    assert "d1 (D=1): 50 steps, 51,200 tokens" in result.stdout
    assert "lm loss against d0 (D=0)" in result.stdout


def test_single_run_plots_go_to_its_directory(tmp_path):
    write_run(tmp_path / "d0", depths=0)
    report = build_report([tmp_path / "d0"])
    assert [p.name for p in report.plots] == ["report_loss_vs_steps.png",
                                              "report_loss_vs_tokens.png"]
    assert all(p.parent == tmp_path / "d0" for p in report.plots)


def test_several_runs_default_to_the_current_directory(two_runs, monkeypatch):
    root, _, _ = two_runs
    cwd = root / "here"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    report = build_report([root / "d0", root / "d1"])
    assert {p.parent for p in report.plots} == {cwd}


def test_broken_last_line_warns_and_every_complete_line_counts(tmp_path):
    train = write_run(tmp_path / "run", depths=2, tail='{"step": 51, "tokens": 52224, "lm_lo')
    result = invoke("report", tmp_path / "run", "--json")
    assert result.exit_code == 0
    assert "metrics.jsonl:53: incomplete last line (run killed mid-write?)" in result.stderr
    out = json.loads(result.stdout)["runs"][0]
    assert out["lines"] == {"train": 50, "val": 2, "broken": [53]}
    assert out["train"]["mtp_2_loss"]["last"] == pytest.approx(train[-1]["mtp_2_loss"])


def test_same_directory_names_get_distinct_labels(tmp_path):
    write_run(tmp_path / "a" / "run", depths=0)
    write_run(tmp_path / "b" / "run", depths=1)
    report = build_report([tmp_path / "a" / "run", tmp_path / "b" / "run"], tmp_path / "out")
    labels = [run.label for run in report.runs]
    assert len(set(labels)) == 2 and all(label.endswith(")") for label in labels)


@pytest.mark.parametrize("make,message", [
    (lambda p: None, "no such run directory"),
    (lambda p: p.mkdir(), "no metrics.jsonl"),
    (lambda p: (p.mkdir(), (p / "metrics.jsonl").write_text("")), "no complete metrics lines"),
    (lambda p: (p.mkdir(), (p / "metrics.jsonl").write_text('{"step": 1, "lm_')),
     "no complete metrics lines"),
])
def test_damaged_runs_exit_2(tmp_path, make, message):
    make(tmp_path / "run")
    result = invoke("report", tmp_path / "run")
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.output


def test_out_that_is_a_file_exits_2(tmp_path):
    write_run(tmp_path / "run", depths=0)
    (tmp_path / "file").write_text("x")
    result = invoke("report", tmp_path / "run", "--out", tmp_path / "file")
    assert result.exit_code == 2 and "not a directory" in result.stderr


def test_moe_metrics_get_their_own_plot(tmp_path):
    run_dir = tmp_path / "moe"
    run_dir.mkdir()
    lines = [{"step": s, "tokens": 64 * s, "lm_loss": 5.0 - 0.01 * s,
              "seq_load_balancing_loss": 1.2 - 0.001 * s, "load_imbalance": 2.0 - 0.01 * s}
             for s in range(1, 31)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    report = build_report([run_dir])
    names = [p.name for p in report.plots]
    assert names == ["report_loss_vs_steps.png", "report_loss_vs_tokens.png",
                     "report_moe_vs_steps.png"]
    image = imread(run_dir / "report_moe_vs_steps.png")
    assert image.shape[1] > 400 and image.std() > 0.01
