"""Pipeline schedules on real gloo processes against the single-process model: every gradient,
the MTP tracker and the validation losses, for 1F1B and interleaved 1F1B layouts. The posts
are recorded with payload checksums: gloo delivers each payload to the receive the trace pairs
it with, the posts are those the one-process fake records (`test_pipeline_trace.py`), and they
replay under NCCL's blocking rules."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from mtp_cli import build_model
from mtp_cli.mtp import MTPLossLoggingHelper
from mtp_cli.parallel.pipeline_p2p import TorchP2P
from mtp_cli.parallel.pipeline_schedule import PipelineSchedule
from mtp_cli.parallel.tied_embeddings import allreduce_embedding_grads
from tests.dist_utils import run_distributed
from tests.pipeline_cases import (
    assert_same_posts,
    batches,
    mean_loss,
    pipeline_spec,
    position_of,
    rank_chunks,
    run_ranks,
)
from tests.pipeline_trace import RecordingP2P, Trace, assert_pairs_match, replay_nccl

LAYOUTS = {  # name: (spec arguments, micro-batches per step)
    "pp2": ({}, 4),
    "pp2_vpp2_tied": ({"virtual": 2, "tied": True}, 4),
    "pp2_vpp2_m8": ({"virtual": 2}, 8),
    "pp2_vpp2_m5_group3": ({"virtual": 2, "group": 3}, 5),
    "pp2_vpp2_standalone_mtp_tied": ({"layout": "Ett|tt|m|L", "tied": True}, 4),
}


def reference(spec, count: int):
    """Gradients, MTP tracker values and per-micro-batch losses of the whole model."""
    MTPLossLoggingHelper.reset()
    model = build_model(spec)
    loss_fn = mean_loss(count)
    losses = []
    for batch in batches(count):
        per_token = model(batch.input_ids, batch.position_ids, labels=batch.labels,
                          loss_mask=batch.loss_mask)
        loss = loss_fn(per_token, batch)
        loss.backward()
        losses.append(loss.detach())
    values = MTPLossLoggingHelper.tracker["values"].clone()
    MTPLossLoggingHelper.reset()
    return {n: p.grad for n, p in model.named_parameters()}, values, losses


def _check_layout(rank: int, name: str, group: dist.ProcessGroup) -> Trace:
    arguments, count = LAYOUTS[name]
    spec = pipeline_spec(2, **arguments)
    tied = spec.model.share_embeddings_and_output_weights
    expected_grads, expected_mtp, expected_losses = reference(spec, count)
    position = position_of(spec, rank)
    chunks = rank_chunks(spec, position)
    recorder = RecordingP2P(TorchP2P(group), checksums=True)
    schedule = PipelineSchedule(chunks, position, recorder,
                                microbatch_group_size=spec.parallel.microbatch_group_size_per_vp_stage)
    losses = schedule.step(batches(count), mean_loss(count))
    allreduce_embedding_grads(chunks, group)
    for chunk in chunks:
        for param_name, param in chunk.named_parameters():
            source = "embedding.word_embeddings.weight" if (
                tied and param_name == "output_layer.weight") else param_name
            torch.testing.assert_close(param.grad, expected_grads[source], atol=1e-6, rtol=1e-5,
                                       msg=f"{name} rank {rank} {param_name}")
    holds_loss = any(position.is_last_stage(c) for c in range(position.num_chunks))
    assert len(losses) == (count if holds_loss else 0)
    if holds_loss:
        torch.testing.assert_close(torch.stack(losses), torch.stack(expected_losses),
                                   atol=1e-6, rtol=0)
        torch.testing.assert_close(MTPLossLoggingHelper.tracker["values"], expected_mtp,
                                   atol=1e-6, rtol=0)
    MTPLossLoggingHelper.reset()
    validation = schedule.forward_only(batches(count), mean_loss(count))
    if holds_loss:
        torch.testing.assert_close(torch.stack(validation), torch.stack(expected_losses),
                                   atol=1e-6, rtol=0)
    else:
        assert validation == []
    return recorder.trace


def _check_traces(name: str, traces: dict[int, Trace]) -> None:
    arguments, count = LAYOUTS[name]
    assert assert_pairs_match(traces) > 0, name  # checksums: each payload reached its receive
    replay_nccl(traces)
    spec = pipeline_spec(2, **arguments)
    fake = [run_ranks(spec, count, train=train)[0] for train in (True, False)]
    for rank, trace in traces.items():
        assert_same_posts(trace, fake[0][rank] + fake[1][rank])


def _run(rank: int, world: int) -> None:
    group = dist.new_group(list(range(world)))
    for name in LAYOUTS:
        trace = _check_layout(rank, name, group)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, trace)
        if rank == 0:
            _check_traces(name, dict(enumerate(gathered)))


@pytest.mark.distributed
def test_pipeline_gradients_losses_and_posts_on_gloo():
    run_distributed(_run, 2)
