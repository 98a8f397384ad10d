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

from mtp_cli import build_model
from mtp_cli.parallel.tensor_parallel import gather_state_dict, parallelize_tensor
from mtp_cli.parallel.tp_grads import sync_sequence_parallel_grads
from mtp_cli.plan.stages import Stage
from mtp_cli.train.step import StepLayout, clip_gradients
from tests.dist_utils import run_distributed
from tests.tp_cases import (
    SEQ,
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


def _check_stage_chain(arch: str, tied: bool, sp: bool) -> None:
    """Stage A (embedding, layer 1) feeding stage B (layer 2, MTP, loss), both TP-converted,
    equals the whole single-process model; B's embedding copy's gradient adds to A's."""
    label = f"stages {arch} tied={tied} sp={sp}"
    spec = make_spec(arch, 2, tied)
    reference = build_model(spec)
    first = build_model(spec, stage=Stage(decoder_layers=(1,),
                                                  final_layernorm=False, loss=False))
    last = build_model(spec, stage=Stage(decoder_layers=(2,), embedding=False,
                                                 mtp_layers=2, mtp_depths_in_loss=2))
    plans = [parallelize_tensor(m, dist.group.WORLD, sequence_parallel=sp) for m in (first, last)]
    batch = make_batch(seed=3)
    ids, positions = batch[:2]
    expected_loss, expected_tracker = forward_backward(reference, batch)
    hidden = first(ids, positions)
    assert hidden.shape[0] == (SEQ // 2 if sp else SEQ), label  # what the pipeline sends
    loss, tracker = forward_backward(
        lambda *a, **k: last(*a, hidden_states=hidden, **k), batch)
    for model in (first, last):
        sync_sequence_parallel_grads(model)
    assert_close(loss, expected_loss, label)
    assert_trackers_equal(tracker, expected_tracker, label)
    grads = full_grads(first, plans[0])
    for name, grad in full_grads(last, plans[1]).items():
        grads[name] = grads[name] + grad if name in grads else grad
    expected = {n: p.grad for n, p in reference.named_parameters()}
    if not tied:
        assert grads.keys() == expected.keys(), label
    for name, grad in expected.items():
        assert_close(grads[name], grad, f"{label}: grad {name}")


def _stage_worker(rank: int, world_size: int) -> None:
    for arch, tied, sp in itertools.product(("gpt", "llama"), (False, True), (False, True)):
        _check_stage_chain(arch, tied, sp)


def test_tp2_pipeline_stages_chain_to_single_process():
    """TP-converted pipeline stages, chained in one process, give the whole model's losses and
    gradients (sequence parallel: the stage sends its sequence slice)."""
    run_distributed(_stage_worker, 2)
