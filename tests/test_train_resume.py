"""Crash safety of `mtp train`, with real processes: a job SIGKILLed as a whole resumes from its
last complete checkpoint with the losses of an uninterrupted run, leaving no orphan worker; a
checkpoint interrupted while being written is never taken as latest; `--max-restarts` restarts
a group that lost a worker; a finished run says so."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from tests.cli_helpers import REPO_ROOT
from tests.train_helpers import (
    assert_same_losses,
    corpus,
    finished_run,
    metrics,
    run_train,
    train_args,
    worker_pids,
)

pytestmark = pytest.mark.distributed


__all__ = ["corpus"]  # the shared fixture


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, corpus):
    """The reference: the same two-process run, never interrupted."""
    return finished_run(tmp_path_factory, corpus, "whole", nproc=2)


def wait_for_step(run_dir, step, process, timeout=300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            if any(x["step"] == step for x in metrics(run_dir)[0]):
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached")


def test_sigkill_of_the_whole_job_resumes_with_the_same_losses(tmp_path, corpus, uninterrupted):
    run_dir = tmp_path / "killed"
    job = subprocess.Popen(train_args(run_dir, corpus, nproc=2), cwd=REPO_ROOT,
                           env={**os.environ, "MTP_TEST_HANG_AT_STEP": "6"},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    try:
        wait_for_step(run_dir, 6, job)
        assert len(worker_pids(run_dir, job.pid)) == 2
        os.kill(job.pid, signal.SIGKILL)  # the launcher alone: its workers must die with it
        job.wait()
        deadline = time.monotonic() + 10
        while worker_pids(run_dir, job.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert worker_pids(run_dir, job.pid) == []  # no orphan outlives its launcher
    finally:  # a failed check must not leave the hanging job behind
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    assert (run_dir / "checkpoints/latest").read_text() == "step_0000004\n"

    result = run_train(run_dir, corpus, nproc=2)
    assert result.returncode == 0, result.stderr
    assert "resuming from step 4" in result.stdout
    assert_same_losses(uninterrupted, run_dir, 1e-6)  # also: steps 5, 6 appear once
    # the run's cumulative acceptance counts came back from the checkpoint
    key = "mtp_1_cumulative_acceptance_rate"
    rates = [x[key] for x in metrics(uninterrupted)[0]]
    assert [x[key] for x in metrics(run_dir)[0]] == rates and len(set(rates)) > 1


def test_interrupted_checkpoint_is_never_latest(tmp_path, corpus, uninterrupted):
    run_dir = tmp_path / "torn"
    result = run_train(run_dir, corpus, nproc=2,
                       env={"MTP_TEST_FAIL_DURING_CHECKPOINT": "8"})
    assert result.returncode != 0
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_0000004\n"
    names = sorted(p.name for p in checkpoints.iterdir())
    assert "step_0000008" not in names
    torn = [n for n in names if n.startswith("step_0000008.tmp-")]
    assert len(torn) == 1 and (checkpoints / torn[0] / ".metadata").exists()  # shards written
    assert not (checkpoints / torn[0] / "meta.json").exists()

    result = run_train(run_dir, corpus, nproc=2)
    assert result.returncode == 0, result.stderr
    assert "resuming from step 4" in result.stdout
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "latest", "step_0000008", "step_0000010"]  # the torn one is gone
    assert_same_losses(uninterrupted, run_dir, 1e-6)


def test_resume_with_another_number_of_processes(tmp_path, corpus, uninterrupted):
    """A two-process checkpoint resumes in one process: DCP reshards, the data stream moves."""
    run_dir = tmp_path / "resharded"
    shutil.copytree(uninterrupted, run_dir)
    (run_dir / "checkpoints/latest").write_text("step_0000008\n")
    result = run_train(run_dir, corpus, nproc=1)
    assert result.returncode == 0, result.stderr
    assert "resuming from step 8" in result.stdout
    meta = json.loads((run_dir / "checkpoints/step_0000010/meta.json").read_text())
    assert meta["world_size"] == 1
    assert_same_losses(uninterrupted, run_dir, 1e-5)


def test_max_restarts_restarts_the_group_after_a_worker_dies(tmp_path, corpus, uninterrupted):
    run_dir = tmp_path / "restarted"
    result = run_train(run_dir, corpus, nproc=2, flags=("--max-restarts", "1"),
                       env={"MTP_TEST_KILL_RANK_AT_STEP": "1:6"})
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout and "step 4" in result.stdout
    assert (run_dir / "checkpoints/latest").read_text() == "step_0000010\n"
    assert_same_losses(uninterrupted, run_dir, 1e-6)


@pytest.mark.parametrize("start_method", ["fork", "exec"])
def test_without_restarts_a_dead_worker_fails_the_job(tmp_path, corpus, start_method):
    """Exec'd workers: torchelastic reports every rank's exit, the killed one by its signal.
    Forked workers: it reports the first failure it observes, which may be the peer's lost
    connection instead."""
    result = run_train(tmp_path / "dead", corpus, "train.steps=3", "checkpoint.interval=0",
                       "train.eval_interval=0", nproc=2,
                       env={"MTP_TEST_KILL_RANK_AT_STEP": "1:2"},
                       flags=("--start-method", start_method))
    assert result.returncode == 1
    assert "step 3/3" not in result.stdout
    if start_method == "exec":
        assert "SIGKILL" in result.stderr
    else:
        # the killed rank, or gloo's "Connection closed / reset by peer" on the other
        assert "SIGKILL" in result.stderr or "by peer" in result.stderr, result.stderr[-3000:]


def test_finished_run_says_so_and_overwrite_starts_afresh(uninterrupted, corpus):
    result = run_train(uninterrupted, corpus, nproc=2)
    assert result.returncode == 0, result.stderr
    assert "already finished" in result.stdout and "step 10" in result.stdout
    for override, message in (("model.hidden_size=64", "model differs from the checkpoint"),
                              ("train.global_batch_size=16", "global batches of 8")):
        changed = run_train(uninterrupted, corpus, override, nproc=2)
        assert changed.returncode == 2
        assert message in changed.stderr.replace("\n", " ")
        assert "Traceback" not in changed.stderr
