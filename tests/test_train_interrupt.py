"""Ctrl-C on `mtp train`: the terminal sends SIGINT to the whole foreground process group (the
launcher and every worker); the job stops with exit code 130 and one line on stderr saying what
stopped and which checkpoint is complete, instead of per-rank tracebacks."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from mtp_cli.checkpoint.run_dir import RunDir, read_latest
from mtp_cli.launch.interrupt import last_logged_step, stopped_message
from tests.train_helpers import REPO_ROOT, TIMEOUT, corpus, train_args, worker_pids  # noqa: F401


def test_stopped_message_names_the_step_and_the_checkpoint(tmp_path):
    run = RunDir(tmp_path)
    assert stopped_message(signal.SIGINT, run) == (
        "mtp train: stopped by Ctrl-C (SIGINT); no checkpoint was completed (the next run "
        "starts afresh)")
    (run.checkpoints / "step_0000004").mkdir(parents=True)
    (run.checkpoints / "step_0000004" / "meta.json").write_text('{"step": 4}')
    run.latest_marker.write_text("step_0000004\n")
    run.metrics.write_text('{"step": 5, "lm_loss": 1.0}\n{"step": 5, "split": "val"}\n'
                           '{"step": 6, "lm_lo')
    assert last_logged_step(run.metrics) == 5
    assert stopped_message(signal.SIGTERM, run) == (
        f"mtp train: stopped by SIGTERM after step 5; the last complete checkpoint is "
        f"{run.checkpoints / 'step_0000004'} (the same command resumes from it)")


@pytest.mark.slow
@pytest.mark.distributed
def test_ctrl_c_prints_one_line_and_exits_130(tmp_path, corpus):  # noqa: F811
    run_dir = tmp_path / "run"
    args = train_args(run_dir, corpus, "train.steps=100000", "checkpoint.interval=2",
                      "train.eval_interval=0", nproc=2)
    job = subprocess.Popen(args, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)  # its own group, like a terminal's
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (run_dir / "checkpoints" / "latest").exists():
            assert job.poll() is None, job.communicate()
            assert time.monotonic() < deadline, "no checkpoint within the timeout"
            time.sleep(0.5)
        os.killpg(job.pid, signal.SIGINT)  # what Ctrl-C does
        stdout, stderr = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 130, stderr
    name, _ = read_latest(run_dir / "checkpoints")
    assert name is not None
    latest = run_dir / "checkpoints" / name
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("mtp train: stopped by Ctrl-C (SIGINT) after step ")
    assert lines[0].endswith(f"; the last complete checkpoint is {latest} (the same command "
                             "resumes from it)")
    assert "Traceback" not in stdout + stderr
    assert worker_pids(run_dir, job.pid) == []
