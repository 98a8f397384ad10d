"""Acceptance: a single-process `mtp train` of the MLA + MoE spec writes a checkpoint that
`inspect-ckpt --strict` passes, whose routers' expert biases moved; a checkpoint missing one
expert, or with an MTP embedding copy that differs, fails and names the tensor."""

from __future__ import annotations

import json

import pytest
import torch

from tests.ckpt_helpers import load_whole_dcp, rewrite_dcp
from tests.cli_helpers import SPECS, run_mtp
from tests.inspect_fixtures import check, invoke_json

pytestmark = [pytest.mark.slow]

SHORT = ["model.num_layers=2", "model.moe_layer_freq=[0, 1]", "model.seq_length=32",
         "train.steps=3", "train.micro_batch_size=2", "train.global_batch_size=4",
         "train.warmup_steps=1", "train.eval_interval=3", "train.eval_steps=1",
         "checkpoint.interval=0", "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("moe") / "run"
    done = run_mtp("train", str(SPECS / "tiny_moe.yaml"), *SHORT, "--run-dir", str(run_dir),
                   timeout=900, real_process=True)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "split" not in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor([r["lm_loss"], r["mtp_1_loss"], r["mtp_2_loss"]])).all()
               for r in train)
    for row in train:  # the MoE metrics: tiny_moe's seq_aux_loss and the load imbalance
        assert row["seq_load_balancing_loss"] > 0 and row["load_imbalance"] >= 1.0
        assert "z_loss" not in row and "load_balancing_loss" not in row
    checkpoints = run_dir / "checkpoints"
    return checkpoints / (checkpoints / "latest").read_text().strip()


def test_strict_passes_and_expert_biases_moved(checkpoint):
    code, out = invoke_json("inspect-ckpt", checkpoint, "--strict")
    assert code == 0, out
    assert [c["name"] for c in out["checks"]] == ["mtp_depths", "shapes", "mtp_ties", "finite"]
    model = load_whole_dcp(checkpoint)["model"]
    biases = [n for n in model if n.endswith("router.expert_bias")]
    assert biases == ["decoder.layers.1.mlp.router.expert_bias",
                      "mtp.layers.0.transformer_layer.mlp.router.expert_bias",
                      "mtp.layers.1.transformer_layer.mlp.router.expert_bias"]
    for name in biases:  # three steps of +-1e-3 from zero
        assert model[name].abs().max() > 0 and model[name].abs().max() <= 3e-3 + 1e-9
    assert "decoder.layers.1.self_attention.linear_kv_down_proj.weight" in model


def test_a_missing_expert_is_named(checkpoint, tmp_path):
    expert = "decoder.layers.1.mlp.experts.local_experts.5."

    def drop_expert(model):
        for name in [n for n in model if n.startswith(expert)]:
            del model[name]

    rewrite_dcp(checkpoint, tmp_path / "ckpt", drop_expert)
    code, out = invoke_json("inspect-ckpt", tmp_path / "ckpt", "--strict")
    assert code == 1
    shapes = check(out, "shapes")
    assert not shapes["passed"]
    assert set(shapes["tensors"]) == {expert + "linear_fc1.weight", expert + "linear_fc2.weight"}
    assert f"missing {expert}linear_fc1.weight" in shapes["reason"]


def test_a_differing_mtp_embedding_copy_is_named(checkpoint, tmp_path):
    copy, main = "mtp.layers.1.embedding.word_embeddings.weight", "embedding.word_embeddings.weight"

    def differing(model):
        model[copy] = model[main].clone()
        model[copy][3, 1] += 0.5

    rewrite_dcp(checkpoint, tmp_path / "ckpt", differing)
    code, out = invoke_json("inspect-ckpt", tmp_path / "ckpt", "--strict")
    assert code == 1
    ties = check(out, "mtp_ties")
    assert ties["tensors"] == [copy] and f"{copy} differs from {main}" in ties["reason"]
