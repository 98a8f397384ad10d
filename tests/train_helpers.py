"""Helpers for the `mtp train` tests: a small corpus, tiny overrides, real launches, metrics."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.cli_helpers import REPO_ROOT

# Tiny enough for a few seconds per run on 2 shared cores; 4 micro-batches per step at DP1.
TINY = [
    "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4",
    "model.num_query_groups=2", "model.ffn_hidden_size=64", "model.seq_length=32",
    "train.steps=10", "train.micro_batch_size=2", "train.global_batch_size=8",
    "train.warmup_steps=2", "train.eval_interval=5", "train.eval_steps=1",
    "checkpoint.interval=4", "checkpoint.keep_last=2",
]
LOSS_KEYS = ("lm_loss", "mtp_1_loss", "mtp_2_loss")
TIMEOUT = 600


def make_corpus(directory: Path) -> Path:
    """A few standard-library sources copied into `directory` (~100 KB of text)."""
    directory.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("json/encoder.py", "json/decoder.py", "textwrap.py", "string.py", "bisect.py",
                 "heapq.py", "fnmatch.py", "shlex.py"):
        shutil.copy(stdlib / name, directory / name.replace("/", "_"))
    return directory


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The small corpus of a test module (import the fixture into the module)."""
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def finished_run(tmp_path_factory, corpus: Path, name: str, nproc: int) -> Path:
    """A complete reference run of the tiny overrides, in its own directory."""
    run_dir = tmp_path_factory.mktemp("runs") / name
    result = run_train(run_dir, corpus, nproc=nproc)
    assert result.returncode == 0, result.stderr
    return run_dir


def train_args(run_dir: Path, corpus: Path, *extra: str, nproc: int = 1) -> list[str]:
    return [sys.executable, "-m", "mtp_cli", "train", "specs/tiny.yaml", *TINY,
            f"data.path={corpus}", *extra, "--run-dir", str(run_dir), "--nproc", str(nproc)]


def run_train(run_dir: Path, corpus: Path, *extra: str, nproc: int = 1,
              env: dict[str, str] | None = None, flags: tuple[str, ...] = ()
              ) -> subprocess.CompletedProcess[str]:
    """One `mtp train` launch, to completion."""
    args = train_args(run_dir, corpus, *extra, nproc=nproc) + list(flags)
    return subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=TIMEOUT,
                          env={**os.environ, **(env or {})})


def metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training lines, validation lines) of a run's metrics.jsonl."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "split" not in x], [x for x in lines if x.get("split") == "val"]


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """The checkpoint of `step` in `run_dir` (`checkpoints/step_0000005`)."""
    return run_dir / "checkpoints" / f"step_{step:07d}"


def final_model(run_dir: Path) -> dict:
    """The model tensors of `run_dir`'s latest checkpoint, each whole (global shapes)."""
    from tests.ckpt_helpers import load_whole_dcp

    checkpoints = run_dir / "checkpoints"
    return load_whole_dcp(checkpoints / (checkpoints / "latest").read_text().strip())["model"]


def assert_same_training(reference: Path, run_dir: Path, *, keys: tuple[str, ...], steps: int,
                         tolerance: float = 1e-5) -> None:
    """`run_dir` trained like `reference`: steps 1..`steps`, each of `keys` per step, and every
    final model tensor (same names, the same global shapes: every expert by its global index)
    to `tolerance`."""
    ref, got = metrics(reference)[0], metrics(run_dir)[0]
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, steps + 1))
    for a, b in zip(ref, got, strict=True):
        for key in keys:
            assert abs(a[key] - b[key]) <= tolerance, (a["step"], key, a[key], b[key])
    ref_model, model = final_model(reference), final_model(run_dir)
    assert sorted(ref_model) == sorted(model)
    for name, value in ref_model.items():
        assert value.shape == model[name].shape, name
        diff = (value.float() - model[name].float()).abs().max().item()
        assert diff <= tolerance, (name, diff)


def assert_same_losses(run_a: Path, run_b: Path, tolerance: float) -> None:
    """Per-step lm and MTP losses (and validation losses) agree to `tolerance`."""
    (train_a, val_a), (train_b, val_b) = metrics(run_a), metrics(run_b)
    assert [x["step"] for x in train_a] == [x["step"] for x in train_b] == list(range(1, 11))
    for a, b in zip(train_a, train_b, strict=True):
        for key in LOSS_KEYS:
            assert abs(a[key] - b[key]) <= tolerance, (a["step"], key, a[key], b[key])
    assert [x["step"] for x in val_a] == [x["step"] for x in val_b]
    for a, b in zip(val_a, val_b, strict=True):
        for key in ("val_lm_loss", "val_mtp_1_loss", "val_mtp_2_loss"):
            assert abs(a[key] - b[key]) <= tolerance, (a["step"], key, a[key], b[key])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def worker_pids(run_dir: Path, launcher: int) -> list[int]:
    """Live worker processes of the job writing `run_dir` (from /proc): every process running
    mtp_cli for `run_dir` but the `launcher` itself (a forked worker has the launcher's command
    line; an exec'd one runs `mtp_cli.launch.worker --run-dir`)."""
    found = []
    marker = str(run_dir.resolve()).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().split()[2]
        except OSError:
            continue
        if b"mtp_cli" in cmdline and marker in cmdline and state != "Z" \
                and int(entry.name) != launcher:
            found.append(int(entry.name))
    return found
