"""The real engine of one rank of a larger job, built in this process against torch's fake
process group (collectives return at once): what a rank holds, without launching the job."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from mtp_cli.parallel.mesh import build_mesh
from mtp_cli.plan.dims import ParallelDims
from mtp_cli.train.engine import build_engine
from mtp_cli.train.step import StepSettings


@contextlib.contextmanager
def fake_rank_engine(spec: Any, world: int, rank: int) -> Iterator[Any]:
    """The `TrainingEngine` of global rank `rank` of `world`; the fake group lives until exit."""
    dims = ParallelDims.from_spec(spec, world)
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    try:
        mesh = build_mesh(dims, "cpu")
        yield build_engine(spec, mesh, StepSettings.for_run(spec, dims, mesh,
                                                            torch.device("cpu")))
    finally:
        dist.destroy_process_group()


def engine_grad_sync(spec, world: int, rank: int) -> tuple[str, int]:
    """(how the real engine synchronises gradients, parameter elements it holds) for global
    rank `rank` of `world`, built in this process against torch's fake process group."""
    from mtp_cli.parallel.fsdp_local import held

    with fake_rank_engine(spec, world, rank) as engine:
        held_elements = sum(held(p).numel() for chunk in engine.chunks
                            for p in chunk.parameters())
        return engine.runner.layout.grad_sync, held_elements
