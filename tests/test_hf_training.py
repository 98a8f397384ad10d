"""Training an imported model with `mtp train` (slow: real launches).

- The import's step-0 checkpoint is what training resumes from: step 1's main and per-depth
  losses equal transformers' own losses (its model and MtpModel) on the same first batch.
- `train.freeze` with the main model frozen and two MTP depths: 20 steps change only the MTP
  parameters (everything else bit-identical to the import), no optimizer state exists for the
  frozen ones, and the MTP losses fall.
- A checkpoint written at TP2 x PP2 (4 processes) exports, without any process group, to the
  same files as the single-process checkpoint of the same weights.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mtp_cli import load_spec
from mtp_cli.data import MicroBatchLoader, build_datasets
from mtp_cli.hf.export import export_checkpoint
from mtp_cli.hf.importer import import_model
from mtp_cli.inspect.checkpoint import open_checkpoint
from tests.cli_helpers import REPO_ROOT
from tests.hf_models import (
    llama_config,
    read_safetensors_dir,
    transformers_pair,
    write_mtp_layers,
)
from tests.hf_parity import ParityPair, hf_depth_logits, roll_left
from tests.train_helpers import TIMEOUT, corpus, metrics  # noqa: F401  (corpus: a fixture)

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow
BATCH = ["model.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=4",
         "train.eval_interval=0", "checkpoint.interval=0", "train.warmup_steps=2"]


def _imported(tmp_path: Path, text: Path, depths: int, *overrides: str) -> tuple[Path, ...]:
    main, mtp = transformers_pair(llama_config(num_mtp_layers=depths), 4)
    hf_dir = tmp_path / "hf"
    main.save_pretrained(hf_dir, max_shard_size="40KB")
    if depths:
        write_mtp_layers(hf_dir, main, mtp)
    run = tmp_path / "run"
    import_model(hf_dir, run, [*BATCH, f"data.path={text}", *overrides])
    return run, main, mtp


def _train(run: Path, *args: str, nproc: int = 1) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "mtp_cli", "train", str(run / "spec.yaml"), "--run-dir", str(run),
         "--nproc", str(nproc), *args], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@torch.no_grad()
def _first_step_losses(run: Path, main, mtp) -> list[float]:
    """transformers' main and per-depth losses on the first global batch `mtp train` draws."""
    spec = load_spec(run / "spec.yaml")
    train_set, _ = build_datasets(spec)
    loader = MicroBatchLoader(train_set, micro_batch_size=spec.train.micro_batch_size,
                              dp_rank=0, dp_size=1, seed=spec.train.seed,
                              global_batch_size=spec.train.global_batch_size)
    totals = torch.zeros(1 + len(mtp.layers), 2, dtype=torch.float64)
    for _ in range(spec.train.global_batch_size // spec.train.micro_batch_size):
        batch = loader.next_batch()
        labels, mask = batch.labels, batch.loss_mask
        for depth, logits in enumerate(hf_depth_logits(ParityPair(main, mtp, None),
                                                       batch.input_ids)):
            losses = F.cross_entropy(logits.flatten(0, 1).double(), labels.flatten(),
                                     reduction="none")
            totals[depth] += torch.stack([(losses * mask.flatten()).sum(), mask.sum()])
            labels, mask = roll_left(labels), roll_left(mask)  # depth k+1 predicts one further
    return (totals[:, 0] / totals[:, 1]).tolist()


def test_train_resumes_the_import_with_transformers_losses(tmp_path, corpus):  # noqa: F811
    run, main, mtp = _imported(tmp_path, corpus, 2, "train.steps=2")
    result = _train(run)
    assert "resumed from step_0000000" in result.stdout
    first = metrics(run)[0][0]
    expected = _first_step_losses(run, main, mtp)
    got = [first["lm_loss"], first["mtp_1_loss"], first["mtp_2_loss"]]
    assert got == pytest.approx(expected, abs=1e-4)
    assert (run / "checkpoints" / "step_0000002" / "meta.json").is_file()


def test_frozen_main_model_trains_only_the_mtp_heads(tmp_path, corpus):  # noqa: F811
    """The usual recipe: a released model (no MTP), two fresh MTP depths, the main model
    frozen, heads detached."""
    run, _, _ = _imported(tmp_path, corpus, 0, "train.steps=20", "mtp.num_layers=2",
                          "train.freeze=[embedding,decoder,output_layer]",
                          "mtp.detach_heads=true", "train.lr=1e-2", "train.log_interval=1")
    before = open_checkpoint(run)
    start = before.read(list(before.tensors))
    _train(run)
    after = open_checkpoint(run)
    assert after.step == 20
    end = after.read(list(after.tensors))
    assert start.keys() == end.keys()
    for name, tensor in start.items():
        if name.startswith("mtp."):
            assert not torch.equal(end[name], tensor), f"{name} did not train"
        else:
            assert torch.equal(end[name], tensor), f"frozen {name} changed"
    moments = {key.split(".", 2)[2].rsplit(".", 1)[0] for key in after.others
               if key.startswith("optimizer.state.")}
    assert moments and all(name.startswith("mtp.") for name in moments)
    lines = metrics(run)[0]
    for depth in (1, 2):
        losses = [line[f"mtp_{depth}_loss"] for line in lines]
        first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
        print(f"mtp_{depth}_loss steps 1-3 {first:.4f} -> steps 18-20 {last:.4f}")
        assert last < first - 0.1, losses


@pytest.mark.distributed
def test_tp2_pp2_checkpoint_exports_like_the_single_process_one(tmp_path, corpus):  # noqa: F811
    """The import (one process) and a TP2 x PP2 run's checkpoint of the same weights (main
    frozen, MTP loss weight 0 and no weight decay: every update is exactly zero) export to the
    same tensors."""
    run, _, _ = _imported(tmp_path, corpus, 1, "train.steps=1")
    parallel = tmp_path / "tp2_pp2"
    shutil.copytree(run, parallel)
    _train(parallel, "parallel.tensor=2", "parallel.pipeline=2",
           "train.freeze=[embedding,decoder,output_layer]", "mtp.loss_scaling_factor=0",
           "train.weight_decay=0", nproc=4)
    written = parallel / "checkpoints" / "step_0000001"
    meta = json.loads((written / "meta.json").read_text())
    assert meta["world_size"] == 4 and meta["parallel"]["tensor"] == 2
    assert len(list(written.glob("*.distcp"))) == 4
    export_checkpoint(run, tmp_path / "single")
    export_checkpoint(parallel, tmp_path / "parallel")
    single, sharded = read_safetensors_dir(tmp_path / "single"), \
        read_safetensors_dir(tmp_path / "parallel")
    assert sorted(single) == sorted(sharded)
    assert all(torch.equal(single[k], sharded[k]) for k in single)
    assert (tmp_path / "single" / "config.json").read_text() == \
        (tmp_path / "parallel" / "config.json").read_text()
