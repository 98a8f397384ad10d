"""How the router's auxiliary losses reach the gradient and the logs, with per-run state.

Megatron-Core attaches each MoE layer's balancing and z losses to an activation with
`MoEAuxLossAutoScaler` (identity forward; backward seeds the loss with the main loss's backward
scale) and records their values in a global metrics tracker. Here both pieces of state belong to
the router that owns them, so two models in one process never share them:
- `AuxLossScale`: the scale the backward pass gives each aux loss (1 / micro-batches, like the
  MTP losses), set by the trainer before each backward (`set_moe_aux_loss_scale`);
- `MoELayerMetrics`: this layer's recorded loss values (Megatron's names: `load_balancing_loss`,
  `seq_load_balancing_loss`, `z_loss`, each divided by its coefficient) and token counts per
  expert, summed over the step's micro-batches until the trainer reads and clears them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class AuxLossScale:
    """What `MoEAuxLossAutoScaler`'s backward multiplies each aux loss's gradient by.

    `per_token`: Megatron's `calculate_per_token_loss` mode, where the step's gradient is
    divided by its loss tokens at the end, so each aux loss is first multiplied by the tokens of
    its micro-batch.
    """

    value: float | torch.Tensor = 1.0
    per_token: bool = False


class MoEAuxLossAutoScaler(torch.autograd.Function):
    """Identity on `output`; backward hands `aux_loss` the gradient `scale.value`."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor,  # type: ignore[override]
                scale: AuxLossScale) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor  # type: ignore[override]
                 ) -> tuple[torch.Tensor, torch.Tensor, None]:
        (aux_loss,) = ctx.saved_tensors
        value = ctx.scale.value
        if isinstance(value, torch.Tensor):
            value = value.to(device=aux_loss.device, dtype=aux_loss.dtype)
        return grad_output, torch.ones_like(aux_loss) * value, None


@dataclass
class MoELayerMetrics:
    """One MoE layer's recorded values since the last `clear` (detached, summed)."""

    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens_per_expert: torch.Tensor | None = None
    muted: bool = False  # while activation recomputation runs the forward again

    def record(self, name: str, value: torch.Tensor) -> None:
        if self.muted:
            return
        value = value.detach().float()
        self.losses[name] = self.losses[name] + value if name in self.losses else value

    def count_tokens(self, routing_map: torch.Tensor) -> None:
        if self.muted:
            return
        counts = routing_map.sum(dim=0).detach().float()
        self.tokens_per_expert = counts if self.tokens_per_expert is None \
            else self.tokens_per_expert + counts

    def clear(self) -> None:
        self.losses.clear()
        self.tokens_per_expert = None


@contextlib.contextmanager
def moe_metrics_muted(module: nn.Module) -> Iterator[None]:
    """The MoE layers inside `module` record nothing while activation recomputation runs its
    forward a second time, in backward: the first forward recorded this micro-batch's losses and
    token counts already (recorded twice, `recompute: full` would log them doubled)."""
    metrics = [m.metrics for m in module.modules()
               if isinstance(getattr(m, "metrics", None), MoELayerMetrics)]
    for each in metrics:
        each.muted = True
    try:
        yield
    finally:
        for each in metrics:
            each.muted = False


def recompute_contexts(module: nn.Module) -> tuple[contextlib.AbstractContextManager[None],
                                                   contextlib.AbstractContextManager[None]]:
    """`torch.utils.checkpoint`'s `context_fn` for `module`: nothing around the first forward,
    `moe_metrics_muted` around the recomputation."""
    return contextlib.nullcontext(), moe_metrics_muted(module)
