"""What an FSDP2 rank holds of a parameter: its local rows, and where they lie.

FSDP2 (`fully_shard` over the data(-and-context) mesh) turns each parameter into a DTensor
sharded by rows (`Shard(0)`), split as `torch.chunk` splits. The parallel transforms that touch
parameters after FSDP2 (the embedding copies' gradient sums, the experts' gradient reductions),
the step and the sharded checkpoint state all read a rank's part through these helpers.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Shard as DTensorShard


def held(value: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: an FSDP2 DTensor's local rows, or the tensor itself."""
    return value.to_local() if isinstance(value, DTensor) else value


def fsdp_coordinates(like: torch.Tensor) -> tuple[int, int]:
    """(rank, size) of FSDP2's 1-D data(-and-context) mesh that `like` is sharded over."""
    if not isinstance(like, DTensor):
        return 0, 1
    if like.device_mesh.ndim != 1 or like.placements != (DTensorShard(0),):
        raise ValueError(f"unexpected FSDP2 layout {like.placements} over {like.device_mesh}")
    return like.device_mesh.get_local_rank(), like.device_mesh.size()


def like(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """`local` (held rows) as a tensor laid out like `param` (a DTensor under FSDP2)."""
    if not isinstance(param, DTensor):
        return local
    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())


def fsdp_rows(length: int, rank: int, size: int) -> tuple[int, int]:
    """The rows [start, end) of a dimension of `length` that FSDP2's `Shard(0)` gives `rank`
    of `size` (torch.chunk's split: ceil(length / size) rows each, the last ones short or
    empty)."""
    step = -(-length // size)
    start = min(rank * step, length)
    return start, min(start + step, length)
