"""Tensor-parallel shards handed to DCP as they are: never gathered to a full tensor.

A checkpoint of a tensor-parallel run stores each parameter (and each Adam moment shaped like
it) under its canonical, single-process name and global shape, as DCP chunks that are the ranks'
local shards. Each rank offers DCP a `ShardedTensor` whose local shards are views of its own
local tensor, with the global chunk list computed from the shard rule (no communication). DCP
writes each chunk once and, on load, reads into any other chunk layout, so a checkpoint written
at TP2 loads at TP1, TP4, or under FSDP2 with no rank holding more than its own slice.

Why a `ShardedTensor` and not a DTensor: SwiGLU's `linear_fc1` is `[gate; up]` and rank r holds
`[gate_r; up_r]`, which are two separate row ranges of the full tensor (`gate_r` at r*k, `up_r`
at F + r*k). A DTensor can only say that with `_StridedShard`, which torch 2.13's DCP does not
survive (overlapping chunks on save, wrong rows on load). A sharded tensor with two local shards
per rank describes it exactly; plain column/row/vocab splits are one shard per rank. It is
built without a process group (the chunk list is global metadata every rank computes the same,
and DCP only reads the local shards and the metadata): `LocalShards` takes the constructor of
`ShardedTensorBase` and answers `size()` as a plain tensor wrapper, not through the deprecated
sharded-op dispatch that wants a process group.

Under FSDP2 (`parallel.fsdp` with tensor/pipeline/context parallel) a rank holds FSDP's rows of
its TP-local tensor; `pieces` intersects the two splits, so the chunks still tile the canonical
global tensor and each rank still offers only what it holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.api import ShardedTensorBase
from torch.distributed._shard.sharding_spec import EnumerableShardingSpec
from torch.distributed._shard.sharding_spec._internals import (
    check_tensor,
    validate_non_overlapping_shards_metadata,
)

from mtp_cli.parallel.fsdp_local import fsdp_rows
from mtp_cli.parallel.tensor_parallel import TensorParallelPlan, tensor_parallel_plan
from mtp_cli.parallel.tp_sharding import ShardRule


class LocalShards(ShardedTensor):
    """A `ShardedTensor` for DCP only: global metadata and this rank's shards, no group."""

    __torch_function__ = torch._C._disabled_torch_function_impl  # size() is the global shape
    held: torch.Tensor  # the rank's tensor the local shards are views of


@dataclass(frozen=True)
class Piece:
    """One chunk of a rank's held tensor: `length` entries from `start` along `dim` of the held
    tensor, at `offsets` (size `sizes`) of the global tensor."""

    dim: int
    start: int
    length: int
    offsets: list[int]
    sizes: list[int]


def pieces(rule: ShardRule | None, tp_shape: torch.Size, tp_rank: int, tp_size: int,
           dp_rank: int = 0, dp_size: int = 1) -> list[Piece]:
    """Where the tensor held by (TP rank, FSDP rank) lies in the global tensor.

    `tp_shape` is the TP-local shape (the global shape without tensor parallel); FSDP2 then
    keeps rows `fsdp_rows(tp_shape[0], dp_rank, dp_size)` of it. A plain TP split is one block
    per rank, SwiGLU's `[gate_r; up_r]` two; under FSDP each block is cut to the held rows.
    """
    shape = list(tp_shape)
    row_start, row_end = fsdp_rows(shape[0], dp_rank, dp_size)
    if rule is None:
        dim, blocks = 0, [(0, 0, shape[0])]
    else:
        dim, blocks = rule.dim, rule.local_blocks(tp_shape, tp_rank, tp_size)
    result = []
    for local_start, global_start, length in blocks:
        offsets, sizes = [0] * len(shape), list(shape)
        if dim == 0:  # the TP blocks and FSDP's rows cut the same dimension
            low, high = max(local_start, row_start), min(local_start + length, row_end)
            if low >= high:
                continue
            offsets[0], sizes[0] = global_start + low - local_start, high - low
            result.append(Piece(0, low - row_start, high - low, offsets, sizes))
        elif row_end > row_start:
            offsets[0], sizes[0] = row_start, row_end - row_start
            offsets[dim], sizes[dim] = global_start, length
            result.append(Piece(dim, local_start, length, offsets, sizes))
    return result


def sharded_tensor(held: torch.Tensor, rule: ShardRule | None, tp_rank: int, tp_size: int, *,
                   tp_shape: torch.Size | None = None, dp_rank: int = 0, dp_size: int = 1
                   ) -> ShardedTensor:
    """`held` (this rank's part under `rule` over `tp_size` ranks, and FSDP2's rows of that
    over `dp_size` when `tp_shape`, the TP-local shape, is given) as a DCP-ready sharded tensor
    whose local shards are views of `held` (DCP loading into them writes into `held`)."""
    tp_shape = held.shape if tp_shape is None else torch.Size(tp_shape)
    if rule is None:  # replicated over TP: every TP rank offers the same chunks (DCP dedups)
        tp_rank, tp_size = 0, 1
    everyone: list[ShardMetadata] = []
    shards: list[Shard] = []
    for t in range(tp_size):
        for d in range(dp_size):
            for piece in pieces(rule, tp_shape, t, tp_size, d, dp_size):
                meta = ShardMetadata(shard_offsets=piece.offsets, shard_sizes=piece.sizes,
                                     placement=f"rank:{t * dp_size + d}/{held.device}")
                everyone.append(meta)
                if (t, d) == (tp_rank, dp_rank):
                    shards.append(Shard(tensor=held.narrow(piece.dim, piece.start,
                                                           piece.length), metadata=meta))
    validate_non_overlapping_shards_metadata(everyone)
    full_shape = tp_shape if rule is None else rule.full_shape(tp_shape, tp_size)
    check_tensor(everyone, list(full_shape))  # the chunks tile the global shape exactly
    result = ShardedTensorBase.__new__(LocalShards, EnumerableShardingSpec(everyone),
                                       *full_shape, dtype=held.dtype, layout=torch.strided,
                                       pin_memory=False, requires_grad=False)
    result._local_shards = shards
    result.held = held
    return result


def local_tensor(value: torch.Tensor | ShardedTensor, rule: ShardRule | None = None
                 ) -> torch.Tensor:
    """The rank's held tensor back from what `sharded_tensor` made (or a plain tensor)."""
    return value.held if isinstance(value, LocalShards) else value


@dataclass
class ModuleSharder:
    """`state_sharder` of a module at `path` in a tensor-parallel model: (local name, tensor)
    -> this rank's shards of the global tensor for DCP (`sharded_state_dict`)."""

    plan: TensorParallelPlan
    path: str

    def __call__(self, name: str, value: torch.Tensor) -> torch.Tensor:
        rule = self.plan.rule(f"{self.path}.{name}" if self.path else name)
        if rule is None or value.dim() == 0 or self.plan.size == 1:
            return value
        return sharded_tensor(value, rule, self.plan.rank, self.plan.size)


def attach_state_sharders(model: nn.Module) -> None:
    """Let the modules of a tensor-parallel `model` that offer Megatron's `sharded_state_dict()`
    (the MTP layer and block) offer this rank's shards under global shapes: each gets the
    sharder of its path under the plan `parallelize_tensor` attached. Without a plan, nothing."""
    plan = tensor_parallel_plan(model)
    if plan is None:
        return
    for path, module in model.named_modules():
        if callable(getattr(module, "sharded_state_dict", None)):
            module.state_sharder = ModuleSharder(plan, path)
