"""Tiny specs, batches and single-step runners shared by the tensor-parallel tests.

The reference is always the single-process model built from the same spec and seed, run in the
same worker process; the tensor-parallel model is a deep copy of it, converted in place.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from mtp_cli import build_model, load_spec
from mtp_cli.mtp import MTPLossLoggingHelper
from mtp_cli.parallel.tensor_parallel import (
    TensorParallelPlan,
    gather_state_dict,
    parallelize_tensor,
)
from mtp_cli.parallel.tp_grads import sync_sequence_parallel_grads
from mtp_cli.train.step import StepLayout, clip_gradients

VOCAB = 16  # small, so that random heads get some argmax hits to compare
SEQ = 8
ARCHS: dict[str, dict[str, Any]] = {
    # LayerNorm, gelu, learned absolute positions, biases everywhere
    "gpt": {"normalization": "LayerNorm", "activation": "gelu",
            "position_embedding": "learned_absolute", "add_bias_linear": True},
    # RMSNorm, SwiGLU, RoPE, grouped-query attention, a QKV bias only
    "llama": {"normalization": "RMSNorm", "activation": "swiglu", "position_embedding": "rope",
              "add_bias_linear": False, "add_qkv_bias": True, "num_query_groups": 2},
    # DeepSeek-V3's multi-latent attention: query and kv latents with their norms, YaRN active
    # (scaling > 1, mscale != mscale_all_dim, SEQ > original_max_position_embeddings)
    "mla": {"normalization": "RMSNorm", "activation": "swiglu", "position_embedding": "rope",
            "add_bias_linear": False, "multi_latent_attention": True, "q_lora_rank": 12,
            "kv_lora_rank": 10, "qk_head_dim": 6, "qk_pos_emb_head_dim": 4, "v_head_dim": 5,
            "qk_layernorm": True, "rope_type": "yarn", "rotary_scaling_factor": 4.0,
            "original_max_position_embeddings": 4, "mscale": 0.7, "mscale_all_dim": 1.0},
}
TRACKED = ("values", "correct", "total")


def make_spec(arch: str, depths: int, tied: bool, **overrides: Any):
    model = {"vocab_size": VOCAB, "hidden_size": 32, "num_layers": 2, "num_attention_heads": 4,
             "ffn_hidden_size": 48, "seq_length": SEQ, "init_method_std": 0.2,
             "share_embeddings_and_output_weights": tied, **ARCHS[arch], **overrides}
    return load_spec({"model": model, "mtp": {"num_layers": depths, "loss_scaling_factor": 0.3}})


def make_batch(seed: int, batch_size: int = 3):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch_size, SEQ + 1), generator=generator)
    mask = (torch.rand(batch_size, SEQ, generator=generator) > 0.25).float()
    positions = torch.arange(SEQ).expand(batch_size, SEQ)
    return tokens[:, :-1], positions, tokens[:, 1:], mask


def reference_and_parallel(spec, group: dist.ProcessGroup, sequence_parallel: bool):
    reference = build_model(spec)
    parallel = copy.deepcopy(reference)
    plan = parallelize_tensor(parallel, group, sequence_parallel=sequence_parallel)
    return reference, parallel, plan


def forward_backward(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token main loss and the MTP tracker after one masked-mean backward."""
    ids, positions, labels, mask = batch
    MTPLossLoggingHelper.reset()
    per_token = model(ids, positions, labels=labels, loss_mask=mask)
    ((per_token * mask).sum() / mask.sum()).backward()
    tracker = {name: MTPLossLoggingHelper.tracker[name].clone()
               for name in TRACKED if name in MTPLossLoggingHelper.tracker}
    MTPLossLoggingHelper.reset()
    return per_token.detach(), tracker


def full_grads(model, plan: TensorParallelPlan) -> dict[str, torch.Tensor]:
    return {name: plan.gather_like_parameter(name, p.grad) for name, p in model.named_parameters()}


def assert_trackers_equal(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                          label: str) -> None:
    assert got.keys() == expected.keys(), label
    for name in expected:
        assert_close(got[name], expected[name], f"{label}: tracker {name}")


def reference_grad_norm(model) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, label: str,
                 atol: float = 1e-5) -> None:
    """`torch.testing.assert_close` to an absolute 1e-5, keeping its report of the mismatch."""
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0,
                               msg=lambda report: f"{label}: {report}")


def check_case(arch: str, depths: int, tied: bool, sp: bool, overrides: dict, *,
               build: Callable | None = None) -> int:
    """Compare one configuration (the TP model vs the single-process one: losses, trackers,
    every gathered gradient, grad norm, state, logits); returns the reference's argmax hits (to
    check coverage). `build` makes the pair (default `reference_and_parallel`)."""
    label = f"{arch} D={depths} tied={tied} sp={sp} {overrides}"
    spec = make_spec(arch, depths, tied, **overrides)
    reference, parallel, plan = (build or reference_and_parallel)(spec, dist.group.WORLD, sp)
    batch = make_batch(seed=depths + 10 * tied)
    expected_loss, expected_tracker = forward_backward(reference, batch)
    loss, tracker = forward_backward(parallel, batch)
    if sp:  # before the sum over TP ranks, replicated gradients are partial
        norm_grad = parallel.decoder.final_layernorm.weight.grad
        assert not torch.allclose(norm_grad, reference.decoder.final_layernorm.weight.grad), label
    sync_sequence_parallel_grads(parallel)

    assert_close(loss, expected_loss, label)
    assert_trackers_equal(tracker, expected_tracker, label)
    expected_grads = {n: p.grad for n, p in reference.named_parameters()}
    grads = full_grads(parallel, plan)
    assert grads.keys() == expected_grads.keys(), label
    for name, grad in grads.items():
        assert_close(grad, expected_grads[name], f"{label}: grad {name}")
    norm = clip_gradients([parallel], 0.0, StepLayout(), torch.device("cpu"))  # 0: no clipping
    assert_close(torch.tensor(norm), reference_grad_norm(reference), label)

    full_state, expected_state = gather_state_dict(parallel), reference.state_dict()
    assert full_state.keys() == expected_state.keys(), label
    assert all(torch.equal(full_state[k], expected_state[k]) for k in full_state), label

    reference.eval()
    parallel.eval()
    with torch.no_grad():
        ids, positions, _, _ = batch
        assert_close(parallel(ids, positions), reference(ids, positions), f"{label}: logits")
    return int(expected_tracker.get("correct", torch.zeros(1)).sum())


def tp_worker(rank: int, world_size: int, cases: list[tuple], build: Callable | None = None
              ) -> None:
    hits = sum(check_case(*case, build=build) for case in cases)
    assert hits > 0, "no case had an argmax hit: acceptance counts were not exercised"


def tp_cases(arch: str, depths, overrides: dict | None = None) -> list[tuple]:
    return [(arch, d, tied, sp, overrides or {})
            for d, tied, sp in itertools.product(depths, (False, True), (False, True))]
