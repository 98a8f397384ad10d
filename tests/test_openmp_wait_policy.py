"""`mtp train` makes its workers' OpenMP threads wait passively, set before torch loads
libgomp (`launch/threads.py`): otherwise a single-process run spins until its first checkpoint
and crawls on a loaded machine."""

from __future__ import annotations

import os
import subprocess

import pytest

from mtp_cli.cli import app
from mtp_cli.launch.threads import prefer_passive_openmp
from tests.train_helpers import REPO_ROOT, TIMEOUT, make_corpus, train_args


@pytest.fixture
def no_openmp_env(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)


def test_passive_unless_the_user_chose(no_openmp_env, monkeypatch):
    prefer_passive_openmp()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    prefer_passive_openmp()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setenv("GOMP_SPINCOUNT", "1000")
    prefer_passive_openmp()
    assert "OMP_WAIT_POLICY" not in os.environ


def test_train_sets_the_policy_before_reading_the_spec(no_openmp_env, monkeypatch):
    """`mtp train` sets it first: reading the spec imports torch (libgomp reads it then)."""
    from typer.testing import CliRunner

    seen = []

    def load_spec(*args, **kwargs):
        seen.append(os.environ.get("OMP_WAIT_POLICY"))
        raise SystemExit(0)

    monkeypatch.setattr("mtp_cli.config.loader.load_spec", load_spec)
    CliRunner().invoke(app, ["train", "specs/tiny.yaml"])
    assert seen == ["PASSIVE"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fork", "exec"])
def test_libgomp_in_the_worker_reads_passive(tmp_path, method):
    """libgomp prints what it read at start (`OMP_DISPLAY_ENV`): a spin count of 0 (passive),
    never its default 300000, in the launcher and (exec) in the worker."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                                                             "OMP_NUM_THREADS")}
    args = train_args(tmp_path / "run", make_corpus(tmp_path / "corpus"), "train.steps=1",
                      "checkpoint.interval=0", "train.eval_interval=0")
    done = subprocess.run([*args, "--start-method", method], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=TIMEOUT, env={**env, "OMP_DISPLAY_ENV": "VERBOSE"})
    assert done.returncode == 0, done.stderr
    spin_counts = [line.split("=")[1].strip() for line in done.stderr.splitlines()
                   if line.strip().startswith("GOMP_SPINCOUNT")]
    assert spin_counts and set(spin_counts) == {"'0'"}, spin_counts
    assert len(spin_counts) == (2 if method == "exec" else 1)
