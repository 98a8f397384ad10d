"""Tiny pipeline set-ups shared by the schedule tests: a spec, its stage chunks, micro-batches."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from mtp_cli import build_model, load_spec
from mtp_cli.gpt import GPTModel
from mtp_cli.parallel.pipeline_position import PipelinePosition
from mtp_cli.parallel.pipeline_schedule import PipelineSchedule, StepRecord
from mtp_cli.plan.placement import build_stage_plan
from tests.pipeline_trace import RecordingP2P, Trace

VOCAB, HIDDEN, SEQ, MICRO = 40, 16, 8, 2


def pipeline_spec(pipeline: int, *, layers: int = 4, depths: int = 1, virtual: int | None = None,
                  layout: str | None = None, tied: bool = False, group: int | None = None,
                  tensor: int = 1) -> Any:
    parallel: dict[str, Any] = {"pipeline": pipeline, "tensor": tensor}
    if virtual is not None:
        parallel["virtual_pipeline"] = virtual
    if layout is not None:
        parallel["layout"] = layout
    if group is not None:
        parallel["microbatch_group_size_per_vp_stage"] = group
    return load_spec({"model": {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_layers": layers,
                                "num_attention_heads": 2, "seq_length": SEQ,
                                "share_embeddings_and_output_weights": tied},
                      "mtp": {"num_layers": depths}, "parallel": parallel})


def position_of(spec: Any, pp_rank: int, seq: int = SEQ) -> PipelinePosition:
    return PipelinePosition(build_stage_plan(spec), pp_rank, hidden_shape=(seq, MICRO, HIDDEN))


def rank_chunks(spec: Any, position: PipelinePosition) -> list[GPTModel]:
    """This rank's stages, built as `mtp train` builds them (global names and init)."""
    return [build_model(spec, stage=stage) for stage in position.stages]


class Batch:
    """One micro-batch: ids, positions, labels and a random loss mask from `seed`."""

    def __init__(self, seed: int):
        generator = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=generator)
        self.input_ids, self.labels = tokens[:, :-1], tokens[:, 1:]
        self.position_ids = torch.arange(SEQ).expand(MICRO, SEQ)
        self.loss_mask = (torch.rand(MICRO, SEQ, generator=generator) > 0.1).float()
        self.packed_seq_params = None


def batches(count: int) -> list[Batch]:
    return [Batch(seed) for seed in range(count)]


def mean_loss(count: int):
    """The loss function of a step of `count` micro-batches: masked mean / count."""
    def loss_fn(per_token: torch.Tensor, batch: Batch) -> torch.Tensor:
        return (per_token * batch.loss_mask).sum() / batch.loss_mask.sum() / count
    return loss_fn


def run_ranks(spec: Any, count: int, *, train: bool = True
              ) -> tuple[dict[int, Trace], dict[int, StepRecord]]:
    """Every pipeline rank's step (or forward pass) in this process, one rank after the other,
    against a recording fake p2p layer (receives get random values: the order of posts does
    not depend on them). Returns each rank's trace and record."""
    traces, records = {}, {}
    for rank in range(spec.parallel.pipeline):
        position = position_of(spec, rank)
        recorder = RecordingP2P(seed=rank)
        schedule = PipelineSchedule(
            rank_chunks(spec, position), position, recorder,
            microbatch_group_size=spec.parallel.microbatch_group_size_per_vp_stage)
        run = schedule.step if train else schedule.forward_only
        losses = run(batches(count), mean_loss(count))
        last = any(position.is_last_stage(c) for c in range(position.num_chunks))
        assert len(losses) == (count if last else 0)
        traces[rank], records[rank] = recorder.trace, schedule.last_record
    return traces, records


def assert_same_posts(trace: Trace, expected: Trace) -> None:
    """The same batches of posts (direction, peer, shape, message), checksums aside."""
    def posts(batches: Trace) -> list[list[tuple]]:
        return [[(x.send, x.peer, x.shape, x.message) for x in batch] for batch in batches]

    assert posts(trace) == posts(expected)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny ops on a shared 2-core machine: a spinning intra-op pool makes them 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
