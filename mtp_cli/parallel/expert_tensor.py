"""Expert tensor parallel (`parallel.expert_tensor`, Megatron-Core's ETP): routed experts split
over the tensor-parallel ranks, entered and left by the token dispatcher.

Run for ETP equal to the tensor-parallel size, the usual Megatron setting: Megatron-Core's
expert mesh (`parallel_state`, order tp-cp-ep-dp-pp) then puts ETP on the tensor ranks and the
expert-parallel groups on the data x context ranks of the same tensor index, exactly the groups
`mtp_cli.parallel.expert_parallel` carves. Each expert's `linear_fc1` is column-parallel
(SwiGLU's `[gate; up]` halves split apart, as for dense MLPs) and `linear_fc2` row-parallel,
both with no communication of their own (`ExpertShardedLinear`). Around them,
`ExpertTensorParallelDispatcher` wraps the layer's dispatcher (the all-to-all one under expert
parallel, the local one without):

- under sequence parallel (Megatron-Core requires it for MoE with tensor parallel) every tensor
  rank routed its own sequence slice, so after the expert-parallel all-to-all the tokens and
  their routing weights are all-gathered over the tensor group (uneven: each rank received its
  own number), regrouped so each local expert sees its rows from every tensor rank as one
  block, and after the experts the partial `linear_fc2` outputs are reduce-scattered back to
  the tensor rank that routed them (`MoEAlltoAllTokenDispatcher`'s `tp_size > 1` path). The
  backward of the all-gather is the reduce-scatter and vice versa;
- without it the tensor ranks hold the same tokens: the region is entered by an identity whose
  backward all-reduces (the tokens' and routing weights' gradients are partial per rank) and
  left by an all-reduce of the partial outputs.

Gradients of the expert shards are then complete on each rank (every token of the tensor group
reached it) and are reduced over the expert-data-parallel group only; the clipping norm sums
their squares over the tensor group as well (`ExpertGradients`), each row counted once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from mtp_cli.models.moe.dispatcher import DispatchedTokens
from mtp_cli.parallel.expert_dispatch import regroup_index
from mtp_cli.parallel.tp_mappings import (
    all_gather_dim,
    copy_to_tensor_parallel_region,
    group_rank,
    reduce_from_tensor_parallel_region,
    reduce_scatter_dim,
)


def _gather_rows(x: torch.Tensor, sizes: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """Every rank's `x` (rank r: `sizes[r]` rows) concatenated in rank order."""
    most = max(sizes)
    if most == 0:
        return x.new_zeros((0, *x.shape[1:]))
    padded = x.new_zeros((most, *x.shape[1:]))
    padded[:x.shape[0]] = x
    gathered = all_gather_dim(padded, 0, group)
    return torch.cat([gathered[r * most:r * most + n] for r, n in enumerate(sizes)])


def _scatter_rows(x: torch.Tensor, sizes: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """`x` (rank-major blocks of `sizes` rows) summed over the ranks; this rank's block."""
    most = max(sizes)
    if most == 0:
        return x.new_zeros((0, *x.shape[1:]))
    padded = x.new_zeros((len(sizes) * most, *x.shape[1:]))
    offset = 0
    for r, n in enumerate(sizes):
        padded[r * most:r * most + n] = x[offset:offset + n]
        offset += n
    return reduce_scatter_dim(padded, 0, group)[:sizes[group_rank(group)]]


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group):  # type: ignore[override]
        ctx.sizes, ctx.group = sizes, group
        return _gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _scatter_rows(grad.contiguous(), ctx.sizes, ctx.group), None, None


class _ScatterRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group):  # type: ignore[override]
        ctx.sizes, ctx.group = sizes, group
        return _scatter_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _gather_rows(grad.contiguous(), ctx.sizes, ctx.group), None, None


def gather_rows(x: torch.Tensor, sizes: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """Uneven all-gather along dim 0 (backward: the uneven reduce-scatter)."""
    return _GatherRows.apply(x, sizes, group)


def scatter_rows(x: torch.Tensor, sizes: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """Uneven reduce-scatter along dim 0 (backward: the uneven all-gather)."""
    return _ScatterRows.apply(x, sizes, group)


@dataclass
class ExpertTensorHandle:
    """What `combine` needs: the inner dispatcher's result, and under sequence parallel the rows
    each tensor rank contributed and the regrouping of the gathered rows."""

    inner: DispatchedTokens
    sizes: list[int] | None = None
    regroup: torch.Tensor | None = None


class ExpertTensorParallelDispatcher:
    """The expert-tensor region around an MoE layer's dispatcher (see the module)."""

    def __init__(self, inner: Any, group: dist.ProcessGroup, sequence_parallel: bool) -> None:
        self.inner, self.group, self.sequence_parallel = inner, group, sequence_parallel

    @property
    def local_expert_indices(self) -> list[int]:
        return self.inner.local_expert_indices

    def dispatch(self, hidden: torch.Tensor, probs: torch.Tensor,
                 routing_map: torch.Tensor) -> DispatchedTokens:
        inner = self.inner.dispatch(hidden, probs, routing_map)
        if not self.sequence_parallel:
            return DispatchedTokens(copy_to_tensor_parallel_region(inner.tokens, self.group),
                                    copy_to_tensor_parallel_region(inner.probs, self.group),
                                    inner.tokens_per_expert, ExpertTensorHandle(inner))
        counts = torch.tensor(inner.tokens_per_expert, dtype=torch.long, device=hidden.device)
        per_rank = all_gather_dim(counts.unsqueeze(0), 0, self.group)  # [tp, local experts]
        sizes = per_rank.sum(dim=1).tolist()
        tokens = gather_rows(inner.tokens.contiguous(), sizes, self.group)
        weights = gather_rows(inner.probs.unsqueeze(1).contiguous(), sizes, self.group)
        regroup = regroup_index(per_rank)  # tensor-rank major -> local-expert major
        return DispatchedTokens(tokens[regroup], weights.squeeze(1)[regroup],
                                per_rank.sum(dim=0).tolist(),
                                ExpertTensorHandle(inner, sizes, regroup))

    def combine(self, expert_output: torch.Tensor, dispatched: DispatchedTokens,
                num_tokens: int) -> torch.Tensor:
        handle: ExpertTensorHandle = dispatched.handle
        if not self.sequence_parallel:
            output = reduce_from_tensor_parallel_region(expert_output, self.group)
        else:
            inverse = torch.empty_like(handle.regroup)
            inverse[handle.regroup] = torch.arange(len(handle.regroup), device=inverse.device)
            output = scatter_rows(expert_output[inverse].contiguous(), handle.sizes, self.group)
        return self.inner.combine(output, handle.inner, num_tokens)
