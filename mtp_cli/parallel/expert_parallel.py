"""Expert parallel (`parallel.expert`): routed experts split over ranks of data x context parallel.

Megatron-Core carves the expert-parallel group out of the data x context ranks: with EP = P and
data x context size N, the N ranks that hold a model replica's dense weights form N / P
expert-parallel groups of P consecutive ranks, and the ranks at the same position of every
expert-parallel group form an expert-data-parallel group (they hold the same experts). Every
rank still runs its own micro-batches; inside each MoE layer the all-to-all dispatcher
(`expert_dispatch.py`) sends each token to the rank of its expert and back.

`apply_expert_parallel` transforms a single-device model (or a stage) in place: each MoE layer
keeps the experts of its rank's block (`local_experts.{e}` keep their GLOBAL index `e`, so
state-dict names, and hence DCP checkpoints, are the same whatever the expert-parallel size: a
checkpoint written at EP2 loads at EP1 or EP4 by name) and gets the all-to-all dispatcher. The
engine applies it to each stage while its parameters are still on the meta device
(`mtp_cli.parallel.meta_init`), so a rank allocates and initialises only its own experts (by
global name: the single-process weights) and never the other ranks'; a DeepSeek-V3-size stage
needs its dense weights plus 1/EP of its experts. Gradients:
- dense parameters (attention, router, shared experts, norms, embeddings) are replicated on all
  N ranks and averaged over them by DDP, which is told to leave the expert parameters alone;
- an expert's gradient on its rank already holds the contributions of every token of its
  expert-parallel group; `ExpertGradients.finalize` sums it over the expert-data-parallel group
  and divides by N, which is the same average over replicas that the dense parameters get;
- the gradient norm adds the expert parameters' squares over the expert-parallel group once.

With FSDP2 (`parallel.fsdp`), composed as torchtitan composes them: each MoE layer's routed
experts are their own FSDP2 unit over the expert-data-parallel mesh (`shard_experts`: the ranks
holding the same experts shard their rows), before the layers and the root are sharded over the
data x context mesh, which therefore leaves the experts alone. Their reduce-scatter averages
over the expert-data-parallel ranks; the step scales them by 1 / EP more, which makes it the
same average over N replicas as above; the norm adds their held rows' squares over both expert
groups.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard

from mtp_cli.models.moe.layer import MoELayer
from mtp_cli.parallel.expert_dispatch import AllToAllTokenDispatcher, expert_block
from mtp_cli.parallel.expert_tensor import ExpertTensorParallelDispatcher
from mtp_cli.parallel.fsdp_local import held
from mtp_cli.parallel.mesh import ExpertParallelGroups

EXPERT_PARAM_MARK = ".local_experts."


def is_expert_parameter(name: str) -> bool:
    """Whether a parameter (by its model name) belongs to a routed expert."""
    return EXPERT_PARAM_MARK in name


def shard_experts(model: nn.Module, mesh: DeviceMesh) -> None:
    """FSDP2 over `mesh` (expert data parallel) for each MoE layer's routed experts, applied
    before the layers' own FSDP2 over data x context (which then skips these parameters).

    FSDP2 averages their gradients over `mesh` (N / EP ranks); the replicas' average divides
    an expert's summed gradient by N (its rank's gradient already holds the tokens of its whole
    expert-parallel group), so the step multiplies them by 1 / EP more
    (`ExpertGradients.rescale_sharded`). torchtitan sets FSDP2's gradient divide factor
    instead; in torch 2.13 that divides twice on a one-rank mesh (expert data parallel 1) when
    the reduction is a plain sum, and gloo has no pre-scaled sum.
    """
    for module in model.modules():
        if isinstance(module, MoELayer):
            fully_shard(module.experts, mesh=mesh)


def apply_expert_parallel(model: nn.Module, groups: ExpertParallelGroups) -> list[str]:
    """Keep this rank's expert block in every MoE layer and inject the all-to-all dispatcher;
    returns the names of the expert parameters kept (for DDP to ignore)."""
    for module in model.modules():
        if not isinstance(module, MoELayer):
            continue
        experts = module.experts.local_experts
        keep = set(expert_block(module.router.config.num_moe_experts, groups.ep_size,
                                groups.ep_rank))
        for index in [e for e in experts if int(e) not in keep]:
            del experts[index]
        dispatcher = AllToAllTokenDispatcher(module.router.config.num_moe_experts,
                                             groups.ep_group)
        current = module.token_dispatcher
        if isinstance(current, ExpertTensorParallelDispatcher):  # TP applied first: inside it
            current.inner = dispatcher
        else:
            module.token_dispatcher = dispatcher
    return [name for name, _ in model.named_parameters() if is_expert_parameter(name)]


class ExpertGradients:
    """The expert parameters' gradient reduction and the gradient norm under expert parallel.

    `model`: the whole model, or an `nn.ModuleList` of a rank's pipeline chunks. With
    `parallel.expert_tensor` 1 (DeepSeek-V3's layout) a tensor rank holds its experts whole and
    computes the same gradients as its tensor peers; with expert tensor parallel (`tp_group`:
    the experts split over the tensor ranks, `mtp_cli.parallel.expert_tensor`) each holds its
    rows, whose squares the norm also sums over `tp_group`. Either way the expert-data-parallel
    group is at one tensor index, so the reduction is the same.
    """

    def __init__(self, model: nn.Module, groups: ExpertParallelGroups, *,
                 sharded: bool = False, tp_group: dist.ProcessGroup | None = None) -> None:
        self.groups = groups
        self.sharded = sharded  # FSDP2 rows over the expert-data-parallel group
        self.tp_group = tp_group  # expert tensor parallel: expert rows split over it
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.expert = [p for n, p in named if is_expert_parameter(n)]
        self.dense = [p for n, p in named if not is_expert_parameter(n)]
        self._ids = {id(p) for p in self.expert}

    def owns(self, param: torch.Tensor) -> bool:
        """Whether `param` is a routed expert's (reduced here, not with the dense ones)."""
        return id(param) in self._ids

    @torch.no_grad()
    def reduce(self, scale: float) -> None:
        """Sum the expert gradients over the expert-data-parallel group, times `scale` (an
        expert no token chose gets a zero gradient, so every rank joins)."""
        for param in self.expert:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        if not self.expert:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in self.expert])
        if self.groups.edp_group is not None:
            dist.all_reduce(flat, group=self.groups.edp_group)
        flat *= scale
        offset = 0
        for param in self.expert:
            count = param.numel()
            param.grad.copy_(flat[offset:offset + count].view_as(param))
            offset += count

    @torch.no_grad()
    def rescale_sharded(self, scale: float) -> None:
        """Under FSDP2: the experts' reduce-scatter averaged over the expert-data-parallel
        ranks (N / EP of them) where the replicas' average divides by N, so times `scale`
        (the dense weights' step scale) / EP."""
        grads = [held(p.grad) for p in self.expert if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, scale / self.groups.ep_size)

    def finalize(self) -> None:
        """Data parallel under DDP: the experts' average over the data x context replicas."""
        self.reduce(1.0 / self.groups.dp_cp_size)

    @torch.no_grad()
    def square_sum(self, device: torch.device | None = None) -> torch.Tensor:
        """Σ ||grad||² over every expert of the expert-parallel group (each counted once; under
        FSDP2 each rank's rows, summed over the expert-data-parallel group too; under expert
        tensor parallel each rank's shards, summed over the tensor group too)."""
        grads = [held(p.grad) for p in self.expert if p.grad is not None]
        device = grads[0].device if grads else device
        total = torch.zeros((), dtype=torch.float32, device=device)
        for grad in grads:
            total = total + grad.float().pow(2).sum()
        groups = [self.groups.ep_group] + ([self.groups.edp_group] if self.sharded else [])
        groups.append(self.tp_group)
        for group in groups:
            if group is not None:
                dist.all_reduce(total, group=group)
        return total

    def clip(self, max_norm: float) -> float:
        """The global gradient norm (each expert counted once) and clipping to `max_norm`
        (0 = no clipping), the same on every rank (data parallel engine: no tensor or
        pipeline parallel)."""
        dense = [p.grad for p in self.dense if p.grad is not None]
        device = dense[0].device if dense else None
        square = self.square_sum(device).double()
        if dense:
            square = square + torch.nn.utils.get_total_norm(dense).double() ** 2
        norm = float(square.sqrt())
        if max_norm > 0:
            params = [p for p in self.dense + self.expert if p.grad is not None]
            torch.nn.utils.clip_grads_with_norm_(params, max_norm,
                                                 torch.tensor(norm, device=square.device))
        return norm
