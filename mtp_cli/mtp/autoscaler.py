"""`MTPLossAutoScaler`: adds the MTP loss to the backward pass of the main loss.

The MTP losses are not part of the loss the trainer sees; instead they ride on the main model's
hidden states. Forward returns the hidden states unchanged; backward passes their gradient
through and hands each MTP loss a gradient of `scale`, so that `scale * sum(mtp_loss)` joins the
objective and its backward runs when the main loss's does.
"""

from __future__ import annotations

import torch


class MTPLossAutoScaler(torch.autograd.Function):
    """Identity on `output`; backward seeds `mtp_loss` with `main_loss_backward_scale`."""

    main_loss_backward_scale: torch.Tensor | float = 1.0

    @staticmethod
    def forward(ctx, output: torch.Tensor, mtp_loss: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(mtp_loss)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        (mtp_loss,) = ctx.saved_tensors
        scale = MTPLossAutoScaler.main_loss_backward_scale
        if isinstance(scale, torch.Tensor):
            scale = scale.to(device=mtp_loss.device, dtype=mtp_loss.dtype)
        return grad_output, torch.ones_like(mtp_loss) * scale

    @staticmethod
    def set_loss_scale(scale: torch.Tensor | float) -> None:
        """The optimizer's loss scale / number of micro-batches (per-token mode: the loss scale)."""
        if isinstance(scale, torch.Tensor):
            scale = scale.detach().clone()
        MTPLossAutoScaler.main_loss_backward_scale = scale
