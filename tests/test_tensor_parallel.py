"""Tensor parallel (real gloo processes) against the single-process model, one step.

For each case: the per-token main loss, every depth's logged MTP loss and acceptance counts,
every parameter's gradient gathered to full, the gradient norm, the gathered state dict and the
no-label logits equal the single-process run's.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

from mtp_cli.parallel.tensor_parallel import gather_state_dict
from mtp_cli.parallel.tp_grads import sync_sequence_parallel_grads, tensor_parallel_grad_norm
from tests.dist_utils import run_distributed
from tests.tp_cases import (
    assert_close,
    assert_trackers_equal,
    forward_backward,
    full_grads,
    make_batch,
    make_spec,
    reference_and_parallel,
    reference_grad_norm,
)

pytestmark = pytest.mark.distributed


def _check_case(arch: str, depths: int, tied: bool, sp: bool, overrides: dict) -> int:
    """Compare one configuration; returns the reference's argmax hits (to check coverage)."""
    label = f"{arch} D={depths} tied={tied} sp={sp} {overrides}"
    spec = make_spec(arch, depths, tied, **overrides)
    reference, parallel, plan = reference_and_parallel(spec, dist.group.WORLD, sp)
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
    assert_close(tensor_parallel_grad_norm(parallel), reference_grad_norm(reference), label)

    full_state, expected_state = gather_state_dict(parallel), reference.state_dict()
    assert full_state.keys() == expected_state.keys(), label
    assert all(torch.equal(full_state[k], expected_state[k]) for k in full_state), label

    reference.eval()
    parallel.eval()
    with torch.no_grad():
        ids, positions, _, _ = batch
        assert_close(parallel(ids, positions), reference(ids, positions), f"{label}: logits")
    return int(expected_tracker.get("correct", torch.zeros(1)).sum())


def _worker(rank: int, world_size: int, cases: list[tuple]) -> None:
    hits = sum(_check_case(*case) for case in cases)
    assert hits > 0, "no case had an argmax hit: acceptance counts were not exercised"


def _cases(arch: str, depths, overrides: dict | None = None) -> list[tuple]:
    return [(arch, d, tied, sp, overrides or {})
            for d, tied, sp in itertools.product(depths, (False, True), (False, True))]


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_tp2_step_matches_single_process(arch):
    """TP2, D = 0, 1, 2, tied and untied, with and without sequence parallel."""
    run_distributed(_worker, 2, _cases(arch, (0, 1, 2)))


def test_tp4_step_matches_single_process():
    """TP4 (one query group per rank for GQA), D = 2, tied/untied, with/without SP."""
    cases = _cases("gpt", (2,)) + _cases("llama", (2,), {"num_attention_heads": 8,
                                                          "num_query_groups": 4})
    run_distributed(_worker, 4, cases)
