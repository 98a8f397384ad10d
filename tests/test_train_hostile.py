"""`mtp train` end to end against hostile files and faults: a pickle in `.metadata` never runs,
damaged checkpoints fall back or are named (exit 2, no traceback), a non-finite run stops at its
first bad step with `latest` on the last finite checkpoint (exit 1, never restarted), a full disk
is said as such (exit 1) and leaves nothing torn named."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.hostile_files import plant_marker_pickle, shard, truncate
from tests.train_helpers import corpus, run_train

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

__all__ = ["corpus"]  # the shared fixture

SHORT = ("train.steps=4", "checkpoint.interval=2", "checkpoint.keep_last=2",
         "train.eval_interval=0")


def strict_json_lines(path):
    """Every line parses as JSON without NaN/Infinity (which json.loads would accept)."""
    def refuse(constant):
        raise ValueError(f"non-JSON constant {constant}")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, corpus):
    """A finished one-process run with checkpoints of steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("hostile") / "run"
    result = run_train(run_dir, corpus, *SHORT)
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.fixture
def run_dir(finished, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(finished, target)
    return target


def _clean_exit(result, code: int) -> str:
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr
    return result.stderr.replace("\n", " ")


def test_a_metadata_pickle_is_refused_and_never_runs(run_dir, corpus, tmp_path):
    marker = tmp_path / "marker"
    for step in (2, 4):
        plant_marker_pickle(run_dir / f"checkpoints/step_{step:07d}", marker)
    err = _clean_exit(run_train(run_dir, corpus, *SHORT[1:], "train.steps=6"), 2)
    assert "checkpoints exist but none validates" in err
    assert "step_0000004/.metadata: DCP metadata does not parse (refusing to load " \
           "tests.hostile_files.write_marker" in err
    assert not marker.exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "latest", "step_0000002", "step_0000004"]  # nothing deleted, nothing created


def test_a_damaged_latest_falls_back_and_the_newer_one_is_kept_aside(run_dir, corpus):
    truncate(shard(run_dir / "checkpoints/step_0000004"))
    result = run_train(run_dir, corpus, *SHORT[1:], "train.steps=6")
    assert result.returncode == 0, result.stderr
    err = result.stderr.replace("\n", " ")
    assert "names step_0000004, which does not validate (" in err
    assert "__0_0.distcp: shard is truncated" in err and "): using step_0000002" in err
    assert "resuming from step 2" in result.stdout
    assert "moved step_0000004 to" in result.stdout
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_0000006\n"
    assert (checkpoints / "abandoned/step_0000004/meta.json").is_file()  # kept, not pruned
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "abandoned", "latest", "step_0000004", "step_0000006"]
    assert [x["step"] for x in strict_json_lines(run_dir / "metrics.jsonl")] == list(range(1, 7))


def test_a_structurally_corrupt_shard_exits_2_naming_it(run_dir, corpus):
    path = shard(run_dir / "checkpoints/step_0000004")
    path.write_bytes(b"\0" * path.stat().st_size)  # lengths check out; the bytes do not load
    err = _clean_exit(run_train(run_dir, corpus, *SHORT[1:], "train.steps=6"), 2)
    assert f"{path}: does not load" in err


def test_a_nan_run_stops_at_the_first_bad_step_and_is_not_restarted(tmp_path, corpus):
    run_dir = tmp_path / "nan"
    result = run_train(run_dir, corpus, "checkpoint.interval=1", "train.eval_interval=0",
                       nproc=2, flags=("--max-restarts", "2"),
                       env={"MTP_TEST_NONFINITE_AT_STEP": "2"})
    err = _clean_exit(result, 1)
    assert "error: non-finite gradient norm at step 2: lm_loss " in err
    assert "grad_norm inf (train.nonfinite: stop)" in err
    assert "latest still names step_0000001, the last good checkpoint" in err
    assert "resumed from" not in result.stdout  # exit 0 from every worker: no restart
    assert (run_dir / "checkpoints/latest").read_text() == "step_0000001\n"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "latest", "step_0000001"]
    lines = strict_json_lines(run_dir / "metrics.jsonl")
    assert [x["step"] for x in lines] == [1, 2]
    assert lines[1]["nonfinite"] is True and lines[1]["grad_norm"] is None
    assert isinstance(lines[1]["lm_loss"], float)  # the gradients went bad, not the loss
    assert lines[1]["skipped"] is False


def test_skip_step_skips_then_stops_after_max_skips_in_a_row(tmp_path, corpus):
    run_dir = tmp_path / "skip"
    result = run_train(run_dir, corpus, "train.warmup_steps=0", "checkpoint.interval=1",
                       "checkpoint.keep_last=10", "train.eval_interval=0",
                       "train.nonfinite=skip_step", "train.nonfinite_max_skips=2",
                       env={"MTP_TEST_NONFINITE_AT_STEP": "2,3,4"})
    err = _clean_exit(result, 1)
    assert "non-finite gradient norm at step 4" in err and "after 2 skipped steps in a row" in err
    assert "latest still names step_0000003" in err
    lines = strict_json_lines(run_dir / "metrics.jsonl")
    assert [(x["step"], x.get("skipped")) for x in lines if x.get("nonfinite")] == [
        (2, True), (3, True), (4, True)]
    assert [x["step"] for x in lines if not x.get("nonfinite")] == [1]
    rates = [x["lr"] for x in lines if x.get("nonfinite")]
    assert rates[0] > rates[1] > rates[2]  # the schedule moved on over the skipped steps
    meta = json.loads((run_dir / "checkpoints/step_0000003/meta.json").read_text())
    assert meta["step"] == 3 and meta["tokens"] == 3 * 8 * 32  # and so did the data


def test_a_full_disk_during_a_checkpoint_leaves_latest_on_the_last_good_one(tmp_path, corpus):
    run_dir = tmp_path / "full"
    result = run_train(run_dir, corpus, *SHORT, nproc=2, env={"MTP_TEST_DISK_FULL": "1:4"})
    err = _clean_exit(result, 1)
    assert "the disk is full: writing checkpoint step_0000004 failed with No space left on " \
           "device" in err
    assert "latest still names step_0000002, the last good checkpoint" in err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "latest", "step_0000002"]  # the torn temporary directory is gone


def test_a_full_disk_at_start_says_so(tmp_path, corpus):
    result = run_train(tmp_path / "start", corpus, *SHORT, env={"MTP_TEST_DISK_FULL": "start"})
    err = _clean_exit(result, 1)
    assert "the disk is full: starting the run failed with No space left on device" in err
    assert "no checkpoint has been completed yet" in err
