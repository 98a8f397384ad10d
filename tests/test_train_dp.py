"""`mtp train` data parallel, end to end with real processes (gloo): DP2 (DDP and FSDP2) and a
two-launcher multi-node job give the per-step losses of DP1 with the same global batch; the run
directory holds what CONTRACTS.md promises (metrics.jsonl, TensorBoard tags, DCP checkpoints)."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
import torch.distributed.checkpoint as dcp
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mtp_cli import build_model, load_spec
from tests.cli_helpers import REPO_ROOT
from tests.train_helpers import (
    TIMEOUT,
    TINY,
    assert_same_losses,
    corpus,
    finished_run,
    free_port,
    metrics,
    run_train,
    train_args,
)

pytestmark = pytest.mark.distributed


__all__ = ["corpus"]  # the shared fixture


@pytest.fixture(scope="module")
def dp1(tmp_path_factory, corpus):
    return finished_run(tmp_path_factory, corpus, "dp1", nproc=1)


def test_dp2_gives_the_losses_of_dp1(tmp_path, corpus, dp1):
    result = run_train(tmp_path / "dp2", corpus, nproc=2)
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr, result.stderr
    assert_same_losses(dp1, tmp_path / "dp2", 1e-5)


def test_fsdp2_gives_the_losses_of_dp1(tmp_path, corpus, dp1):
    result = run_train(tmp_path / "fsdp", corpus, "parallel.fsdp=true", nproc=2)
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr, result.stderr  # e.g. FSDP2's "returned a view tensor"
    assert_same_losses(dp1, tmp_path / "fsdp", 1e-5)


def test_per_token_loss_dp2_gives_the_losses_of_dp1(tmp_path, corpus):
    runs = {}
    for nproc in (1, 2):
        runs[nproc] = tmp_path / f"pt{nproc}"
        result = run_train(runs[nproc], corpus, "train.calculate_per_token_loss=true",
                           nproc=nproc)
        assert result.returncode == 0, result.stderr
    assert_same_losses(runs[1], runs[2], 1e-5)


def test_two_launchers_with_c10d_rendezvous_form_one_job(tmp_path, corpus, dp1):
    run_dir = tmp_path / "nodes"
    flags = ["--nnodes", "2", "--rdzv-endpoint", f"localhost:{free_port()}"]
    args = train_args(run_dir, corpus, nproc=1) + flags
    nodes = [subprocess.Popen(args, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=TIMEOUT) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    meta = json.loads((run_dir / "checkpoints/step_0000010/meta.json").read_text())
    assert meta["world_size"] == 2 and meta["parallel"]["data"] == 2
    assert_same_losses(dp1, run_dir, 1e-5)


def test_metrics_lines_carry_the_contract_fields(dp1):
    train, val = metrics(dp1)
    per_depth = [f"mtp_{k}_{name}" for k in (1, 2)
                 for name in ("loss", "acceptance_rate", "cumulative_acceptance_rate")]
    expected = ["step", "tokens", "lm_loss", *per_depth, "lr", "grad_norm", "tokens_per_s",
                "tflops_per_device", "mfu", "peak_memory_mb", "mtp_loss_scale", "skipped_steps", "time"]
    assert all(sorted(line) == sorted(expected) for line in train)
    assert [x["tokens"] for x in train] == [8 * 32 * s for s in range(1, 11)]
    assert all(x["mtp_loss_scale"] == 0.3 and x["skipped_steps"] == 0 for x in train)
    assert train[0]["lr"] == pytest.approx(3e-3 / 2)  # first of two warmup steps
    assert [x["step"] for x in val] == [5, 10]
    assert all(sorted(x) == sorted(["step", "tokens", "split", "val_tokens", "val_lm_loss",
                                    "val_mtp_1_loss", "val_mtp_2_loss"]) for x in val)
    assert train[-1]["lm_loss"] < train[0]["lm_loss"] - 0.5
    assert 0 <= train[-1]["mtp_1_cumulative_acceptance_rate"] <= 100


def test_tensorboard_has_megatron_tags(dp1):
    events = EventAccumulator(str(dp1 / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"lm loss", "mtp_1 loss", "mtp_2 loss", "mtp_1_acceptance_rate",
            "mtp_2_cumulative_acceptance_rate", "learning-rate", "grad-norm",
            "tokens-per-second", "val lm loss", "val mtp_1 loss", "val mtp_2 loss"} <= tags
    lm = [e.value for e in events.Scalars("lm loss")]
    assert lm == pytest.approx([x["lm_loss"] for x in metrics(dp1)[0]], abs=1e-6)


def test_checkpoints_follow_the_contract(dp1):
    checkpoints = dp1 / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_0000010\n"
    # keep_last 2: step 4 pruned; no temporary left
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "latest", "step_0000008", "step_0000010"]
    last = checkpoints / "step_0000010"
    assert {".metadata", "__0_0.distcp", "meta.json"} <= {p.name for p in last.iterdir()}
    meta = json.loads((last / "meta.json").read_text())
    assert meta["format"] == "mtp-cli-checkpoint/1"
    assert (meta["step"], meta["tokens"], meta["world_size"]) == (10, 2560, 1)
    assert meta["parallel"] == {"data": 1, "tensor": 1, "pipeline": 1, "context": 1}
    assert meta["spec"]["mtp"]["num_layers"] == 2
    assert len(meta["mtp_cumulative"]["correct"]) == len(meta["mtp_cumulative"]["total"]) == 2
    final = metrics(dp1)[0][-1]
    assert meta["losses"] == pytest.approx({k: final[k] for k in ("lm_loss", "mtp_1_loss",
                                                                   "mtp_2_loss")})
    keys = set(dcp.FileSystemReader(str(last)).read_metadata().state_dict_metadata)
    for key in ("model.decoder.layers.1.mlp.linear_fc1.weight", "model.mtp.layers.1.eh_proj.weight",
                "model.embedding.word_embeddings.weight", "scheduler.last_epoch", "trainer.step",
                "trainer.tokens", "rng.rank0.torch", "data.rank0.micro_batches"):
        assert key in keys, key
    assert any(k.startswith("optimizer.state.decoder.layers.0.") for k in keys)


def test_checkpoint_loads_into_a_plain_model(dp1):
    """The stored model is the spec's model: a fresh one loads it with every key matched."""
    meta = json.loads((dp1 / "checkpoints/step_0000010/meta.json").read_text())
    model = build_model(load_spec(meta["spec"]))
    state = {"model": model.state_dict()}
    before = state["model"]["decoder.layers.0.mlp.linear_fc1.weight"].clone()
    dcp.load(state, checkpoint_id=str(dp1 / "checkpoints/step_0000010"))
    model.load_state_dict(state["model"])
    assert not torch.equal(model.decoder.layers["0"].mlp.linear_fc1.weight, before)


def test_tiny_overrides_are_what_the_tests_run():
    spec = load_spec("specs/tiny.yaml", TINY)
    assert spec.train.global_batch_size // spec.train.micro_batch_size == 4
