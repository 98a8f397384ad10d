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
"""

from __future__ import annotations

import torch
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.api import ShardedTensorBase
from torch.distributed._shard.sharding_spec import EnumerableShardingSpec
from torch.distributed._shard.sharding_spec._internals import (
    check_tensor,
    validate_non_overlapping_shards_metadata,
)

from mtp_cli.parallel.tp_sharding import ShardRule


class LocalShards(ShardedTensor):
    """A `ShardedTensor` for DCP only: global metadata and this rank's shards, no group."""

    __torch_function__ = torch._C._disabled_torch_function_impl  # size() is the global shape


def _shard_metadata(rule: ShardRule, local_shape: torch.Size, rank: int, size: int,
                    device: torch.device) -> list[ShardMetadata]:
    metadata = []
    for _, start, length in rule.local_blocks(local_shape, rank, size):
        offsets, sizes = [0] * len(local_shape), list(local_shape)
        offsets[rule.dim], sizes[rule.dim] = start, length
        metadata.append(ShardMetadata(shard_offsets=offsets, shard_sizes=sizes,
                                      placement=f"rank:{rank}/{device}"))
    return metadata


def sharded_tensor(local: torch.Tensor, rule: ShardRule, rank: int, size: int) -> ShardedTensor:
    """`local` (rank `rank` of `size`'s shard under `rule`) as a DCP-ready sharded tensor whose
    local shards are views of `local` (writing into them on load writes into `local`)."""
    shape = local.shape
    everyone = [m for r in range(size) for m in _shard_metadata(rule, shape, r, size,
                                                                 local.device)]
    mine = _shard_metadata(rule, shape, rank, size, local.device)
    shards = [Shard(tensor=local.narrow(rule.dim, start, length), metadata=meta)
              for (start, _, length), meta in zip(rule.local_blocks(shape, rank, size), mine,
                                                  strict=True)]
    validate_non_overlapping_shards_metadata(everyone)
    full_shape = rule.full_shape(shape, size)
    check_tensor(everyone, list(full_shape))  # the chunks tile the global shape exactly
    result = ShardedTensorBase.__new__(LocalShards, EnumerableShardingSpec(everyone),
                                       *full_shape, dtype=local.dtype, layout=torch.strided,
                                       pin_memory=False, requires_grad=False)
    result._local_shards = shards
    return result


def local_tensor(value: torch.Tensor | ShardedTensor, rule: ShardRule | None) -> torch.Tensor:
    """The rank's local tensor back from what `sharded_tensor` made (or a plain tensor)."""
    if not isinstance(value, ShardedTensor):
        return value
    assert rule is not None
    return torch.cat([shard.tensor for shard in value.local_shards()], dim=rule.dim)
