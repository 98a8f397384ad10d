"""A blended run resumes exactly at DP2 and at DP1, and a changed blend is refused at launch
unless data.allow_data_change restarts the stream (slow: real `mtp train` launches)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from mtp_cli.data import write_indexed_dataset
from tests.cli_helpers import REPO_ROOT
from tests.train_helpers import TIMEOUT, TINY, assert_same_losses

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Two byte-token indexed datasets of different ranges; two blends of them."""
    root = tmp_path_factory.mktemp("blend")
    generator = torch.Generator().manual_seed(0)
    for name, low in (("a", 1), ("b", 128)):
        documents = [torch.randint(low, low + 120, (int(n),), generator=generator).tolist()
                     for n in torch.randint(20, 200, (60,), generator=generator)]
        write_indexed_dataset(root / name, documents, dtype=torch.uint16)
    return f"0.3 {root / 'a'} 0.7 {root / 'b'}", f"0.5 {root / 'a'} 0.5 {root / 'b'}"


def train(run_dir, blend: str, *extra: str, nproc: int) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "mtp_cli", "train", "specs/tiny.yaml", *TINY,
            f"data.blend={blend}", *extra, "--run-dir", str(run_dir), "--nproc", str(nproc)]
    return subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, corpora):
    run_dir = tmp_path_factory.mktemp("runs") / "blend_dp2"
    result = train(run_dir, corpora[0], nproc=2)
    assert result.returncode == 0, result.stderr
    assert "blend: 30.00% of the samples (weight 0.3000)" in result.stdout
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert [round(v["fraction"], 4) for v in first["data_blend"].values()] == [0.3, 0.7]
    return run_dir


@pytest.mark.parametrize("nproc", [2, 1])
def test_blended_run_resumes_exactly(tmp_path, corpora, uninterrupted, nproc):
    run_dir = tmp_path / "resumed"
    shutil.copytree(uninterrupted, run_dir)
    (run_dir / "checkpoints/latest").write_text("step_0000008\n")
    result = train(run_dir, corpora[0], nproc=nproc)
    assert result.returncode == 0, result.stderr
    assert "resuming from step 8" in result.stdout
    assert_same_losses(uninterrupted, run_dir, 1e-5)


def test_a_changed_blend_is_refused_unless_the_stream_may_restart(tmp_path, corpora,
                                                                  uninterrupted):
    run_dir = tmp_path / "changed"
    shutil.copytree(uninterrupted, run_dir)
    (run_dir / "checkpoints/latest").write_text("step_0000008\n")
    refused = train(run_dir, corpora[1], "train.steps=12", nproc=1)
    assert refused.returncode == 2, refused.stderr
    assert "data.blend" in refused.stderr and "allow_data_change" in refused.stderr
    allowed = train(run_dir, corpora[1], "train.steps=12", "data.allow_data_change=true",
                    nproc=1)
    assert allowed.returncode == 0, allowed.stderr
    assert "data stream restarts" in allowed.stdout + allowed.stderr
    meta = json.loads((run_dir / "checkpoints/step_0000012/meta.json").read_text())
    assert meta["spec"]["data"]["blend"][1]["weight"] == 0.5
