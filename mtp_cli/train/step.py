"""One optimizer step and one validation pass, for every layout: the only step path.

A step runs this rank's micro-batches (straight through its one model part, or through the
pipeline schedule over its stages), then:

1. the step's (loss sum, loss tokens) summed over pipeline and data x context ranks;
2. sequence-parallel gradient sums, then embedding-copy gradient sums over the embedding group;
3. data parallel: gradients summed over data x context ranks (context ranks hold different
   tokens of the same sequences; each micro-batch's loss is already normalised by its
   context-global token count), then averaged over data ranks, or divided by the step's tokens
   in per-token mode. With DDP or FSDP2 the backward already averaged them over data x context
   ranks, and only the scale is left; otherwise one coalesced all-reduce;
4. `clip_gradients`, the one clipping function: every logical weight counted once (TP shards
   summed, replicated weights once, embedding copies skipped, FSDP2 rows and pipeline stages
   summed), then the optimizer step, dropped when the loss or the norm is non-finite
   (`StepOutput.applied`); MoE expert biases move only on applied steps.

Normalisation follows Megatron-Core. Per-micro-batch mode: each micro-batch's objective is its
masked-mean main loss plus the MTP term, divided by the number of micro-batches
(`MTPLossAutoScaler.set_loss_scale(1/num_microbatches)` scales the MTP term the same way; MoE
auxiliary losses likewise). Per-token mode (`train.calculate_per_token_loss`): the objective is
the masked sum, the MTP term's scale is 1, and the step's gradient is divided by the global
number of loss tokens at the end. Either way the gradient of a global batch is the same whatever
the layout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from mtp_cli.models.moe.run_state import set_moe_aux_loss_scale, update_expert_bias
from mtp_cli.mtp.autoscaler import MTPLossAutoScaler
from mtp_cli.mtp.logging_helper import MTPLossLoggingHelper
from mtp_cli.parallel.data_parallel import gradient_sync
from mtp_cli.parallel.expert_parallel import is_expert_parameter
from mtp_cli.parallel.fsdp_local import held
from mtp_cli.parallel.tied_embeddings import allreduce_embedding_grads
from mtp_cli.parallel.tp_grads import grad_square_sum, sync_sequence_parallel_grads
from mtp_cli.train.nonfinite import update_is_finite

if TYPE_CHECKING:
    from mtp_cli.config.schema import RunSpec
    from mtp_cli.parallel.mesh import ParallelMesh
    from mtp_cli.plan.dims import ParallelDims

# called with this rank's model parts once a step's gradients are reduced (a fault point)
GradientHook = Callable[[Sequence[nn.Module]], None]


@dataclass
class StepSettings:
    """What a step needs besides the model and the batches."""

    num_microbatches: int
    per_token_loss: bool
    grad_clip: float
    bf16: bool
    device: torch.device
    dp_cp_size: int
    dp_cp_group: dist.ProcessGroup | None  # None: a single replica
    # expert parallel: the experts' gradient reduction and the global norm
    # (mtp_cli.parallel.expert_parallel.ExpertGradients); None without it
    expert_grads: Any = None
    # Megatron-LM #4116: the MTP parameters get their own gradient norm, clipped alone
    mtp_separate_grad_norm: bool = False

    @classmethod
    def for_run(cls, spec: RunSpec, dims: ParallelDims, mesh: ParallelMesh,
                device: torch.device) -> StepSettings:
        """The settings of `spec`'s training on `mesh` (the trainer's, and a dry run's)."""
        return cls(num_microbatches=dims.num_microbatches(spec),
                   per_token_loss=spec.train.calculate_per_token_loss,
                   grad_clip=spec.train.grad_clip, bf16=spec.train.bf16, device=device,
                   dp_cp_size=dims.dp_cp,
                   dp_cp_group=mesh.dp_cp_group if dims.dp_cp > 1 else None,
                   mtp_separate_grad_norm=spec.mtp.separate_grad_norm)

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)


@dataclass
class StepOutput:
    lm_loss: float  # token-weighted over the global batch
    loss_tokens: int  # loss tokens in the global batch
    grad_norm: float
    applied: bool = True  # False: non-finite loss or gradient norm, the update was dropped
    mtp_grad_norm: float | None = None  # mtp.separate_grad_norm: the MTP parameters' own


@dataclass
class StepLayout:
    """The process groups a step reduces over (None: that dimension has size 1) and how data
    parallel synchronises gradients."""

    tp_group: dist.ProcessGroup | None = None
    pp_group: dist.ProcessGroup | None = None
    cp_group: dist.ProcessGroup | None = None
    dp_cp_group: dist.ProcessGroup | None = None
    embedding_group: dist.ProcessGroup | None = None  # holders of the embedding and its copies
    dp: int = 1
    cp: int = 1
    # "allreduce": this step sums gradients; "ddp" / "fsdp": the backward averaged them over
    # data x context ranks (FSDP2 also leaves each rank rows of every gradient)
    grad_sync: str = "allreduce"
    skip: Callable[[nn.Module, str], bool] = field(default=lambda chunk, name: False)
    # expert parallel (`ExpertGradients`): routed experts' gradients summed over the ranks
    # holding the same experts, their squares counted once over the expert-parallel group
    experts: Any = None


def clip_gradients(chunks: Sequence[nn.Module], max_norm: float, layout: StepLayout,
                   device: torch.device) -> float:
    """The one clipping function: the norm of the whole model's gradient with every logical
    weight counted once (TP shards summed over the TP group, TP-replicated weights counted on
    TP rank 0, `layout.skip` copies left out, FSDP2 rows summed over data x context, stages
    summed over the pipeline); gradients scaled to `max_norm` (0 = do not clip). Returns the
    norm before clipping."""
    square = torch.zeros((), dtype=torch.float32, device=device)
    shards = [layout.dp_cp_group] if layout.grad_sync == "fsdp" and \
        layout.dp_cp_group is not None else []
    experts = layout.experts
    for chunk in chunks:
        square = square + grad_square_sum(
            chunk, layout.tp_group, sum_groups=shards,
            skip=lambda name, c=chunk: layout.skip(c, name) or (
                experts is not None and is_expert_parameter(name)))
    if experts is not None:  # summed over the expert group (and the tensor group under ETP)
        square = square + experts.square_sum(device)
    if layout.pp_group is not None:
        dist.all_reduce(square, group=layout.pp_group)
    norm = square.sqrt()
    if max_norm > 0:
        coefficient = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        grads = [held(p.grad) for chunk in chunks for p in chunk.parameters()
                 if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, coefficient.to(grads[0].device))
    return float(norm)


def is_mtp_parameter(name: str) -> bool:
    """Megatron's grad_norm_group 'mtp': the MTP block's own parameters (not the shared
    embedding or output head)."""
    return name.startswith("mtp.")


def clip_gradients_separately(chunks: Sequence[nn.Module], max_norm: float,
                              layout: StepLayout, device: torch.device) -> tuple[float, float]:
    """`mtp.separate_grad_norm` (Megatron-LM #4116): the norm of the MTP parameters' gradients
    and that of every other parameter, counted as `clip_gradients` counts them, each group
    clipped to `max_norm` on its own. Returns (the others' norm, the MTP norm) before
    clipping. (No routed experts: the rules refuse MoE with it.)"""
    shards = [layout.dp_cp_group] if layout.grad_sync == "fsdp" and \
        layout.dp_cp_group is not None else []
    squares = torch.zeros(2, dtype=torch.float32, device=device)
    for chunk in chunks:
        for index, in_group in enumerate((lambda n: not is_mtp_parameter(n), is_mtp_parameter)):
            squares[index] += grad_square_sum(
                chunk, layout.tp_group, sum_groups=shards,
                skip=lambda name, c=chunk, g=in_group: layout.skip(c, name) or not g(name))
    if layout.pp_group is not None:
        dist.all_reduce(squares, group=layout.pp_group)
    norms = squares.sqrt()
    if max_norm > 0:
        for index, in_group in enumerate((lambda n: not is_mtp_parameter(n), is_mtp_parameter)):
            grads = [held(p.grad) for chunk in chunks for n, p in chunk.named_parameters()
                     if p.grad is not None and in_group(n)]
            if grads:
                coefficient = (max_norm / (norms[index] + 1e-6)).clamp(max=1.0)
                torch._foreach_mul_(grads, coefficient.to(grads[0].device))
    return float(norms[0]), float(norms[1])


class StepRunner:
    """Micro-batches, reductions, clipping and the optimizer step over this rank's model parts.

    `chunks` are the plain model parts (named like the single-process model); `modules` what
    to call for a forward (a DDP wrapper, or the chunks themselves); `schedule` the pipeline
    schedule when there are pipeline stages.
    """

    def __init__(self, chunks: Sequence[nn.Module], optimizer: torch.optim.Optimizer,
                 settings: StepSettings, layout: StepLayout, *, depths: int = 0,
                 modules: Sequence[nn.Module] | None = None, schedule: Any = None) -> None:
        self.chunks, self.optimizer = list(chunks), optimizer
        self.settings, self.layout, self.depths = settings, layout, depths
        self.modules = list(modules) if modules is not None else self.chunks
        self.schedule = schedule

    # --- the micro-batches ---------------------------------------------------------------------
    def _cp_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.layout.cp_group is not None:
            dist.all_reduce(value, group=self.layout.cp_group)
        return value

    def _scales(self, count: int) -> None:
        """The MTP and MoE auxiliary losses' backward scale (1, or 1 / micro-batches)."""
        per_token = self.settings.per_token_loss
        scale = 1.0 if per_token else 1.0 / count
        MTPLossAutoScaler.set_loss_scale(scale)
        set_moe_aux_loss_scale(self.chunks, scale, per_token=per_token)

    def run(self, batches: list[Any], totals: torch.Tensor, *, train: bool) -> None:
        """Forward (and backward when training) every micro-batch; add up the main loss."""
        per_token, count = self.settings.per_token_loss, len(batches)

        def loss_fn(per_token_loss: torch.Tensor, batch: Any) -> torch.Tensor:
            mask = batch.loss_mask.float()
            loss_sum = (per_token_loss.float() * mask).sum()
            tokens = mask.sum()
            totals.add_(torch.stack([loss_sum.detach(), tokens.detach()]).double())
            if per_token:
                return loss_sum
            return loss_sum / self._cp_sum(tokens.clone()).clamp(min=1) / count

        batches = [b.to(self.settings.device) for b in batches]
        MTPLossLoggingHelper.ensure_tracker(self.depths, self.settings.device,
                                            self.layout.pp_group, self.layout.dp_cp_group)
        if train:
            self._scales(count)
        with self.settings.autocast():
            if self.schedule is not None and train:
                self.schedule.step(batches, loss_fn, self.settings.device)
            elif self.schedule is not None:
                self.schedule.forward_only(batches, loss_fn, self.settings.device)
            else:
                model = self.modules[0]
                for index, batch in enumerate(batches):
                    with gradient_sync(model, enabled=not train or index == count - 1):
                        per_token_loss = model(
                            batch.input_ids, batch.position_ids, labels=batch.labels,
                            loss_mask=batch.loss_mask,
                            packed_seq_params=batch.packed_seq_params)
                        loss = loss_fn(per_token_loss, batch)
                        if train:
                            loss.backward()

    def _reduce_totals(self, totals: torch.Tensor) -> torch.Tensor:
        """(loss sum, tokens) of the global batch, on every rank (the loss stage computed it)."""
        for group in (self.layout.pp_group, self.layout.dp_cp_group):
            if group is not None:
                dist.all_reduce(totals, group=group)
        return totals

    # --- gradients -----------------------------------------------------------------------------
    def _reduce_gradients(self, tokens: float) -> None:
        """Sum over data x context ranks, then average over data ranks (or per token)."""
        layout, per_token = self.layout, self.settings.per_token_loss
        experts = layout.experts
        trained = [p for chunk in self.chunks for p in chunk.parameters()
                   if p.requires_grad and (experts is None or not experts.owns(p))]
        if layout.grad_sync != "allreduce":  # the backward averaged over data x context
            dp_cp = layout.dp * layout.cp
            scale = dp_cp / max(tokens, 1.0) if per_token else float(layout.cp)
            grads = [held(p.grad) for p in trained if p.grad is not None]
            if grads and scale != 1.0:
                torch._foreach_mul_(grads, scale)
            if experts is not None:  # FSDP2 averaged them over their replicas only
                experts.rescale_sharded(scale)
            return
        for param in trained:  # a parameter no token reached (an unchosen expert) gets zeros
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        grads = [p.grad for p in trained]
        scale = 1.0 / max(tokens, 1.0) if per_token else 1.0 / layout.dp
        if experts is not None:  # over the ranks holding the same experts
            experts.reduce(scale)
        if not grads:
            return
        if layout.dp_cp_group is None:
            if scale != 1.0:
                torch._foreach_mul_(grads, scale)
            return
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=layout.dp_cp_group)
        flat.mul_(scale)
        for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            grad.copy_(reduced)

    # --- a step --------------------------------------------------------------------------------
    def train_step(self, batches: list[Any], *, before_norm: GradientHook | None = None
                   ) -> StepOutput:
        """One optimizer step over `batches`; `before_norm` sees the reduced gradients before
        the norm and the non-finite check (the trainer's fault point)."""
        totals = torch.zeros(2, dtype=torch.float64, device=self.settings.device)
        self.run(batches, totals, train=True)
        totals = self._reduce_totals(totals)
        for chunk in self.chunks:
            sync_sequence_parallel_grads(chunk)
        allreduce_embedding_grads(self.chunks, self.layout.embedding_group)
        self._reduce_gradients(float(totals[1]))
        if before_norm is not None:
            before_norm(self.chunks)
        mtp_grad_norm = None
        if self.settings.mtp_separate_grad_norm:
            grad_norm, mtp_grad_norm = clip_gradients_separately(
                self.chunks, self.settings.grad_clip, self.layout, self.settings.device)
        else:
            grad_norm = clip_gradients(self.chunks, self.settings.grad_clip, self.layout,
                                       self.settings.device)
        lm_loss = float(totals[0] / totals[1].clamp(min=1))
        applied = update_is_finite(lm_loss, grad_norm) and (
            mtp_grad_norm is None or update_is_finite(lm_loss, mtp_grad_norm))
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if applied:  # a skipped step's token counts do not move the expert biases either
            update_expert_bias(self.chunks, reduce_counts=self._sum_over_replicas)
        return StepOutput(lm_loss=lm_loss, loss_tokens=int(totals[1]), grad_norm=grad_norm,
                          applied=applied, mtp_grad_norm=mtp_grad_norm)

    def _sum_over_replicas(self, values: torch.Tensor) -> torch.Tensor:
        """Token counts over the tensor x data x context ranks, as Megatron-Core sums them for
        the expert-bias update (under sequence parallel each tensor rank routed a slice; without
        it the tensor ranks count the same tokens, a common factor the update ignores)."""
        for group in (self.layout.tp_group, self.layout.dp_cp_group):
            if group is not None:
                dist.all_reduce(values, group=group)
        return values

    # --- validation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, batches: list[Any]) -> dict[str, float]:
        """`val_lm_loss` (token-weighted) and `val_mtp_{k}_loss` over `batches`, reduced over
        pipeline and data x context ranks like the training metrics."""
        for chunk in self.chunks:
            chunk.eval()
            chunk.track_mtp_in_eval = True
        try:
            totals = torch.zeros(2, dtype=torch.float64, device=self.settings.device)
            self.run(batches, totals, train=False)
            totals = self._reduce_totals(totals)
        finally:
            for chunk in self.chunks:
                chunk.train()
                chunk.track_mtp_in_eval = False
        result = {"val_lm_loss": float(totals[0] / totals[1].clamp(min=1))}
        if self.depths:
            MTPLossLoggingHelper.reduce_loss_in_tracker()
            values = MTPLossLoggingHelper.tracker["values"].double().cpu()
            result.update({f"val_mtp_{k + 1}_loss": float(values[k])
                           for k in range(self.depths)})
            MTPLossLoggingHelper.clean_loss_in_tracker()
        return result


def _depths(model: nn.Module) -> int:
    mtp = getattr(model, "mtp", None)
    return int(getattr(mtp, "num_depths", 0)) if mtp is not None else 0


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[Any],
               settings: StepSettings) -> StepOutput:
    """One step of a single whole model (data parallel over `settings.dp_cp_group` when set,
    by one all-reduce): the engine's step path with no model parallel. The MTP losses land in
    `MTPLossLoggingHelper.tracker`; the caller reports them."""
    layout = StepLayout(dp_cp_group=settings.dp_cp_group, dp=settings.dp_cp_size,
                        experts=settings.expert_grads)
    return StepRunner([model], optimizer, settings, layout, depths=_depths(model)
                      ).train_step(batches)

