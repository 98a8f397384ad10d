"""One optimizer step (gradient accumulation over micro-batches) and one validation pass.

Normalisation follows Megatron-Core. Per-micro-batch mode: each micro-batch's objective is its
masked-mean main loss plus the MTP term, divided by the number of micro-batches
(`MTPLossAutoScaler.set_loss_scale(1/num_microbatches)` scales the MTP term the same way), and
data parallel averages over ranks. Per-token mode (`train.calculate_per_token_loss`): the
objective is the masked sum, the MTP term's scale is 1, and the step's gradient is divided by
the global number of loss tokens at the end. Either way the gradient of a global batch is the
same whatever the data-parallel size.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from mtp_cli.models.moe.run_state import set_moe_aux_loss_scale, update_expert_bias
from mtp_cli.mtp.autoscaler import MTPLossAutoScaler
from mtp_cli.mtp.logging_helper import MTPLossLoggingHelper
from mtp_cli.parallel.data_parallel import gradient_sync
from mtp_cli.train.nonfinite import update_is_finite


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

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)


@dataclass
class StepOutput:
    lm_loss: float  # token-weighted over the global batch
    loss_tokens: int  # loss tokens in the global batch
    grad_norm: float
    applied: bool = True  # False: non-finite loss or gradient norm, the update was dropped


def micro_batch_loss(model: nn.Module, batch: Any, settings: StepSettings
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward one micro-batch: (masked sum of the main per-token loss, loss tokens)."""
    with settings.autocast():
        per_token = model(batch.input_ids, batch.position_ids, labels=batch.labels,
                          loss_mask=batch.loss_mask, packed_seq_params=batch.packed_seq_params)
    mask = batch.loss_mask.float()
    return (per_token.float() * mask).sum(), mask.sum()


def _sum_over_replicas(values: torch.Tensor, settings: StepSettings) -> torch.Tensor:
    if settings.dp_cp_group is not None:
        dist.all_reduce(values, group=settings.dp_cp_group)
    return values


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[Any],
               settings: StepSettings) -> StepOutput:
    """Forward/backward every micro-batch of this rank, then clip and take the optimizer step
    (not when the loss or the gradient norm is non-finite: `StepOutput.applied`).

    The MTP losses land in `MTPLossLoggingHelper.tracker`; the caller reports them. MoE
    routers' auxiliary losses get the MTP losses' backward scale, and after the step every
    expert bias moves by the step's token counts, summed over the data x context replicas.
    """
    num_micro = settings.num_microbatches
    totals = torch.zeros(2, dtype=torch.float64, device=settings.device)
    for index, batch in enumerate(batches):
        batch = batch.to(settings.device)
        with gradient_sync(model, enabled=index == num_micro - 1):
            loss_sum, tokens = micro_batch_loss(model, batch, settings)
            if settings.per_token_loss:
                objective = loss_sum
                MTPLossAutoScaler.set_loss_scale(1.0)
                set_moe_aux_loss_scale(model, 1.0, per_token=True)
            else:
                objective = loss_sum / tokens.clamp(min=1) / num_micro
                MTPLossAutoScaler.set_loss_scale(1.0 / num_micro)
                set_moe_aux_loss_scale(model, 1.0 / num_micro)
            objective.backward()
        totals += torch.stack([loss_sum.detach(), tokens.detach()]).double()
    totals = _sum_over_replicas(totals, settings)
    if settings.expert_grads is not None:  # averaged over replicas like DDP's, by hand
        settings.expert_grads.finalize()
    if settings.per_token_loss:  # data parallel averaged; we want the sum over all tokens
        scale = settings.dp_cp_size / max(float(totals[1]), 1.0)
        for param in model.parameters():
            if param.grad is not None:
                param.grad.mul_(scale)
    grad_norm = (clip_gradients(model, settings.grad_clip) if settings.expert_grads is None
                 else settings.expert_grads.clip(settings.grad_clip))
    lm_loss = float(totals[0] / totals[1].clamp(min=1))
    applied = update_is_finite(lm_loss, grad_norm)
    if applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if applied:  # a skipped step's token counts do not move the expert biases either
        update_expert_bias(model,
                           reduce_counts=lambda counts: _sum_over_replicas(counts, settings))
    return StepOutput(lm_loss=lm_loss, loss_tokens=int(totals[1]), grad_norm=grad_norm,
                      applied=applied)


def clip_gradients(model: nn.Module, max_norm: float) -> float:
    """Clip to `max_norm` (0 = do not clip) and return the total gradient norm before clipping.

    Works for DTensor (FSDP2) gradients: their norm is reduced over the mesh.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, num_batches: int, settings: StepSettings,
             depths: int) -> dict[str, float]:
    """`val_lm_loss` (token-weighted) and `val_mtp_{k}_loss` over `num_batches` micro-batches
    of this rank, reduced over data x context parallel like the training metrics."""
    totals = torch.zeros(2, dtype=torch.float64, device=settings.device)
    for _ in range(num_batches):
        loss_sum, tokens = micro_batch_loss(model, loader.next_batch().to(settings.device),
                                            settings)
        totals += torch.stack([loss_sum, tokens]).double()
    totals = _sum_over_replicas(totals, settings)
    result = {"val_lm_loss": float(totals[0] / totals[1].clamp(min=1))}
    if depths:
        MTPLossLoggingHelper.reduce_loss_in_tracker()
        values = MTPLossLoggingHelper.tracker["values"].double().cpu()
        result.update({f"val_mtp_{k + 1}_loss": float(values[k]) for k in range(depths)})
        MTPLossLoggingHelper.clean_loss_in_tracker()
    return result
