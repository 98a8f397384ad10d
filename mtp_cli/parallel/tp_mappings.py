"""Autograd-aware collectives that move activations in and out of the tensor-parallel region.

Megatron's "mappings": each is a pair of conjugate collectives, one in forward and its adjoint in
backward, so that gradients of sharded computations come out right without touching autograd
elsewhere. Sequence-parallel ones act on dim 0 (the sequence of `[s, b, h]` activations); the
last-dim ones on the hidden dimension. Every function takes its process group explicitly.

    copy_to_tensor_parallel_region       fwd identity        bwd all-reduce
    reduce_from_tensor_parallel_region   fwd all-reduce      bwd identity
    gather_last_dim                      fwd all-gather(-1)  bwd split(-1)
    scatter_to_sequence_parallel_region  fwd split(0)        bwd all-gather(0)
    gather_from_sequence_parallel_region fwd all-gather(0)   bwd reduce-scatter(0)
    reduce_scatter_to_sequence_parallel  fwd reduce-scatter(0) bwd all-gather(0)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

Group = dist.ProcessGroup

# torch >= 2.13 renames the single-tensor collectives; older releases only have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_size(group: Group | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Group | None) -> int:
    return 0 if group is None else dist.get_rank(group)


# --- plain collectives (no autograd) ---------------------------------------------------------
def all_reduce(x: torch.Tensor, group: Group, op: dist.ReduceOp = dist.ReduceOp.SUM
               ) -> torch.Tensor:
    """A reduced copy of `x` (the input is left untouched)."""
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=op, group=group)
    return out


def all_gather_dim(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim`, in rank order."""
    size = group_size(group)
    x = x.movedim(dim, 0).contiguous()
    out = x.new_empty((size * x.shape[0], *x.shape[1:]))
    _all_gather_single(out, x, group=group)
    return out.movedim(0, dim)


def reduce_scatter_dim(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Sum over ranks, each keeping its contiguous `1/size` block along `dim`."""
    size = group_size(group)
    x = x.movedim(dim, 0).contiguous()
    if x.shape[0] % size:
        raise ValueError(f"dimension {dim} of size {x.shape[0]} does not divide by {size} ranks")
    out = x.new_empty((x.shape[0] // size, *x.shape[1:]))
    _reduce_scatter_single(out, x, group=group)
    return out.movedim(0, dim)


def split_dim(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """This rank's contiguous block of `x` along `dim` (a copy)."""
    size = group_size(group)
    if x.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} does not divide by {size} ranks")
    return x.chunk(size, dim=dim)[group_rank(group)].contiguous()


# --- autograd functions ---------------------------------------------------------------------
class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None


class _GatherLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        ctx.group = group
        return all_gather_dim(x, -1, group)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return split_dim(grad, -1, ctx.group), None


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        ctx.group = group
        return split_dim(x, 0, group)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return all_gather_dim(grad, 0, ctx.group), None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        ctx.group = group
        return all_gather_dim(x, 0, group)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return reduce_scatter_dim(grad, 0, ctx.group), None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        ctx.group = group
        return reduce_scatter_dim(x, 0, group)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return all_gather_dim(grad, 0, ctx.group), None


def copy_to_tensor_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Enter a column-parallel computation: every rank's partial input gradient gets summed."""
    return _CopyToRegion.apply(x, group)


def reduce_from_tensor_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Leave a row-parallel computation: sum the partial outputs."""
    return _ReduceFromRegion.apply(x, group)


def gather_last_dim(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Reassemble a column-parallel output `[..., n/tp]` into the full `[..., n]`."""
    return _GatherLastDim.apply(x, group)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Replicated `[s, ...]` -> this rank's `[s/tp, ...]` (sequence parallel)."""
    return _ScatterToSequence.apply(x, group)


def gather_from_sequence_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """`[s/tp, ...]` -> `[s, ...]` before a column-parallel computation (sequence parallel)."""
    return _GatherFromSequence.apply(x, group)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Partial `[s, ...]` -> summed `[s/tp, ...]` after a row-parallel one (sequence parallel)."""
    return _ReduceScatterToSequence.apply(x, group)
