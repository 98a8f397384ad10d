"""Tensor parallel (real gloo processes) against the single-process model, one step.

For each case: the per-token main loss, every depth's logged MTP loss and acceptance counts,
every parameter's gradient gathered to full, the gradient norm, the gathered state dict and the
no-label logits equal the single-process run's.
"""

from __future__ import annotations

import itertools

import pytest
import torch.distributed as dist

from mtp_cli import build_model
from mtp_cli.parallel.tensor_parallel import parallelize_tensor
from mtp_cli.parallel.tp_grads import sync_sequence_parallel_grads
from mtp_cli.plan.stages import Stage
from tests.dist_utils import run_distributed
from tests.tp_cases import (
    SEQ,
    assert_close,
    assert_trackers_equal,
    forward_backward,
    full_grads,
    make_batch,
    make_spec,
    tp_cases,
    tp_worker,
)

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_tp2_step_matches_single_process(arch):
    """TP2, D = 0, 1, 2, tied and untied, with and without sequence parallel."""
    run_distributed(tp_worker, 2, tp_cases(arch, (0, 1, 2)))


def test_tp4_step_matches_single_process():
    """TP4 (one query group per rank for GQA), D = 2, tied/untied, with/without SP."""
    cases = tp_cases("gpt", (2,)) + tp_cases("llama", (2,), {"num_attention_heads": 8,
                                                          "num_query_groups": 4})
    run_distributed(tp_worker, 4, cases)


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
