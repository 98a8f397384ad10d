"""`mtp.distill` under tensor and context parallel (gloo): equal to one device.

TP2: each rank holds half of the vocabulary's logits; the softmax statistics and the KL's sum
over the vocabulary go through the head's comm. CP2: each rank holds two zigzag chunks of the
sequence; the main logits' roll fetches each chunk's next row from the neighbour rank, and the
KL's sums and token counts are summed over the ranks. Losses, the per-depth KL in the tracker and
every gradient must equal the single-process model's.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from mtp_cli import build_model
from mtp_cli.mtp import MTPLossLoggingHelper
from mtp_cli.parallel.context_parallel import apply_context_parallel
from mtp_cli.parallel.tp_grads import sync_sequence_parallel_grads
from tests import cp_cases as cp_case
from tests.cp_cases import zigzag_shard
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


def _cp_worker(rank: int, world: int, packed_lengths: list[int] | None) -> None:
    spec = cp_case.make_spec()
    ids, positions, labels, mask, params, boundaries = cp_case.make_batch(packed_lengths)
    reference = build_model(spec)
    reference.loss_settings.mtp_distill = True
    MTPLossLoggingHelper.reset()
    _, loss = cp_case.objective(reference, ids, positions, labels, mask, params, mask.sum())
    loss.backward()
    expected = {n: MTPLossLoggingHelper.tracker[n].clone() for n in ("values", "distill")}
    MTPLossLoggingHelper.reset()

    group = dist.new_group(list(range(world)))
    model = build_model(spec)
    model.loss_settings.mtp_distill = True
    apply_context_parallel(model, group)
    shard = [zigzag_shard(t, boundaries, rank, world) for t in (ids, positions, labels, mask)]
    _, loss = cp_case.objective(model, *shard, params, mask.sum())
    loss.backward()
    assert torch.all(expected["distill"] > 1e-3)
    for name, value in expected.items():
        assert_close(MTPLossLoggingHelper.tracker[name], value, f"cp tracker {name}")
    MTPLossLoggingHelper.reset()
    for name, param in model.named_parameters():
        grad = param.grad.clone()
        dist.all_reduce(grad, group=group)  # CP ranks hold different tokens: gradients add up
        torch.testing.assert_close(grad, dict(reference.named_parameters())[name].grad,
                                   atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("packed_lengths", [None, [4, 8, 4]], ids=["plain", "packed"])
def test_cp2_distill_matches_single_process(packed_lengths):
    run_distributed(_cp_worker, 2, packed_lengths)
