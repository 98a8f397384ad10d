"""The run directory: the lock, the latest marker, pruning, metrics truncation, --overwrite."""

from __future__ import annotations

import fcntl
import json

import pytest

from mtp_cli.checkpoint.run_dir import (
    RunDir,
    RunDirLock,
    check_creatable,
    checkpoint_name,
    truncate_metrics,
)
from mtp_cli.errors import UserError


def make_checkpoint(run: RunDir, step: int, *, complete: bool = True) -> None:
    path = run.checkpoints / checkpoint_name(step)
    path.mkdir(parents=True)
    if complete:
        (path / "meta.json").write_text(json.dumps({"step": step}))


def test_lock_keeps_a_second_job_out_until_released(tmp_path):
    run = RunDir(tmp_path)
    with RunDirLock(run):
        with pytest.raises(UserError, match="in use by another `mtp train`"):
            RunDirLock(run).acquire()
        # another opening of the file is kept out too (a flock belongs to the open file, so
        # this is what another process meets), and shared (multi-node) locks as well
        with open(run.lock_file, "a+") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_SH | fcntl.LOCK_NB)
    RunDirLock(run).acquire()


def test_shared_locks_coexist_but_exclude_a_single_node_job(tmp_path):
    run = RunDir(tmp_path)
    first, second = RunDirLock(run, shared=True), RunDirLock(run, shared=True)
    first.acquire()
    second.acquire()
    with pytest.raises(UserError):
        RunDirLock(run).acquire()
    first.release()
    second.release()


def test_stale_temporaries_go_and_prune_keeps_the_newest_by_step(tmp_path):
    run = RunDir(tmp_path)
    for step in (2, 4, 6, 10):
        make_checkpoint(run, step)
    run.latest_marker.write_text("step_0000010\n")
    (run.checkpoints / "step_0000012.tmp-abcd").mkdir()
    removed = run.prune(2)
    assert sorted(p.name for p in removed) == ["step_0000002", "step_0000004"]
    assert sorted(p.name for p in run.checkpoints.iterdir()) == [
        "latest", "step_0000006", "step_0000010", "step_0000012.tmp-abcd"]
    assert [p.name for p in run.remove_stale_temporaries()] == ["step_0000012.tmp-abcd"]


def test_truncate_metrics_drops_later_steps_and_a_broken_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "lm_loss": 3.0}, {"step": 2, "lm_loss": 2.9},
             {"step": 2, "split": "val", "val_lm_loss": 2.8}, {"step": 3, "lm_loss": 2.7}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 4, "lm_')
    truncate_metrics(path, 2)
    assert [json.loads(x) for x in path.read_text().splitlines()] == lines[:3]


def test_clear_removes_only_run_results(tmp_path):
    run = RunDir(tmp_path)
    make_checkpoint(run, 2)
    run.tb.mkdir()
    run.metrics.write_text("{}\n")
    (tmp_path / "notes.txt").write_text("mine")
    run.clear()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_run_dir_under_a_regular_file_is_refused_without_creating_anything(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="is not a directory"):
        check_creatable(blocker / "run")
    check_creatable(tmp_path / "a" / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
