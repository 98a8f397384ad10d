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
