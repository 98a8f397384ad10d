"""`mtp.distill` under tensor parallel (gloo, TP2): the vocab-sharded KL equals one device's.

Each rank holds half of the vocabulary's logits; the softmax statistics and the KL's sum over the
vocabulary go through the head's comm. Losses, the per-depth KL in the tracker and every
gradient (gathered) must equal the single-process model's, with and without sequence parallel.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from mtp_cli.mtp import MTPLossLoggingHelper
from mtp_cli.parallel.tp_grads import sync_sequence_parallel_grads
from tests.dist_utils import run_distributed
from tests.tp_cases import assert_close, full_grads, make_batch, make_spec, reference_and_parallel

pytestmark = pytest.mark.distributed
TRACKED = ("values", "correct", "total", "distill", "distill_count")


def _forward_backward(model, batch):
    ids, positions, labels, mask = batch
    MTPLossLoggingHelper.reset()
    per_token = model(ids, positions, labels=labels, loss_mask=mask)
    ((per_token * mask).sum() / mask.sum()).backward()
    tracker = {name: MTPLossLoggingHelper.tracker[name].clone() for name in TRACKED}
    MTPLossLoggingHelper.reset()
    return per_token.detach(), tracker


def _check(arch: str, tied: bool, sp: bool) -> None:
    label = f"distill {arch} tied={tied} sp={sp}"
    reference, parallel, plan = reference_and_parallel(make_spec(arch, 2, tied),
                                                       dist.group.WORLD, sp)
    for model in (reference, parallel):
        model.loss_settings.mtp_distill = True
        model.loss_settings.mtp_distill_temperature = 1.5
    batch = make_batch(seed=21)
    expected_loss, expected_tracker = _forward_backward(reference, batch)
    loss, tracker = _forward_backward(parallel, batch)
    sync_sequence_parallel_grads(parallel)
    assert torch.all(expected_tracker["distill"] > 1e-3), label
    assert_close(loss, expected_loss, label)
    for name in TRACKED:
        assert_close(tracker[name], expected_tracker[name], f"{label}: tracker {name}")
    expected_grads = {n: p.grad for n, p in reference.named_parameters()}
    for name, grad in full_grads(parallel, plan).items():
        assert_close(grad, expected_grads[name], f"{label}: grad {name}")


def _worker(rank: int, world_size: int) -> None:
    for arch, tied, sp in (("llama", False, False), ("gpt", True, True)):
        _check(arch, tied, sp)


def test_tp2_distill_matches_single_process():
    run_distributed(_worker, 2)
