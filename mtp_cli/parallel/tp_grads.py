"""Gradients of a tensor-parallel model: sequence-parallel sums and the clipping norm.

Without sequence parallel every replicated parameter (norms, position table, row-parallel
biases) gets the same full gradient on every TP rank, because the activations it touches and
their gradients are replicated. With sequence parallel each rank sees only its slice of the
sequence, so those gradients are partial and must be summed over the TP group once per step,
after the last backward (Megatron's `allreduce_sequence_parallel_grads`).

The gradient norm counts each logical parameter once (Megatron's rule): the squares of sharded
gradients are summed over the TP ranks, replicated ones are counted on TP rank 0 only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from mtp_cli.parallel.tensor_parallel import TensorParallelPlan, tensor_parallel_plan
from mtp_cli.parallel.tp_mappings import group_rank


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local part of a (possibly FSDP2 / DTensor) gradient."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def _plan(model: nn.Module) -> TensorParallelPlan:
    plan = tensor_parallel_plan(model)
    return plan if plan is not None else TensorParallelPlan(group=None)


def sync_sequence_parallel_grads(model: nn.Module) -> None:
    """Sum the replicated parameters' gradients over the TP group (no-op without sequence
    parallel). Call once per step after the last backward, before clipping and the optimizer.
    One coalesced all-reduce."""
    plan = _plan(model)
    if not plan.sequence_parallel or plan.size == 1:
        return
    grads = [_local(p.grad) for name, p in model.named_parameters()
             if p.grad is not None and not plan.is_sharded(name)]
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=plan.group)
    for grad, summed in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
        grad.copy_(summed)


def grad_square_sum(model: nn.Module, tp_group: dist.ProcessGroup | None = None, *,
                    skip: Callable[[str], bool] | None = None,
                    sum_groups: Sequence[dist.ProcessGroup] = ()) -> torch.Tensor:
    """Σ over the logical parameters of `model` of ||grad||², equal on every TP rank.

    `tp_group` defaults to the plan's group. `skip(name)` leaves parameters out (pipeline
    parallel: tied copies counted on another stage). The TP sum is then summed over each of
    `sum_groups`: the pipeline group (each stage holds other parameters) and, under FSDP2, the
    data-parallel group (each rank holds a slice of every gradient; DDP needs none).
    """
    plan = _plan(model)
    group = tp_group if tp_group is not None else plan.group
    count_replicated = group_rank(group) == 0
    total = None
    for name, param in model.named_parameters():
        if param.grad is None or (skip is not None and skip(name)):
            continue
        if not plan.is_sharded(name) and not count_replicated:
            continue
        square = _local(param.grad).detach().float().pow(2).sum()
        total = square if total is None else total + square
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    total = torch.zeros((), device=device) if total is None else total
    for reduce_group in (group, *sum_groups):
        if reduce_group is not None and dist.get_world_size(reduce_group) > 1:
            dist.all_reduce(total, group=reduce_group)
    return total
