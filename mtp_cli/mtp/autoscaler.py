"""`MTPLossAutoScaler`: adds the MTP loss to the backward pass of the main loss.

The MTP losses are not part of the loss the trainer sees; instead they ride on the main model's
hidden states. Forward returns the hidden states unchanged; backward passes their gradient
through and hands each MTP loss a gradient of `scale`, so that `scale * sum(mtp_loss)` joins the
objective and its backward runs when the main loss's does.

The scale is per run (`mtp_cli.mtp.run_state`): `set_loss_scale` and `main_loss_backward_scale`
act on the current run's state, and each forward remembers the state it ran under, so its
backward uses that run's scale even when another model's forward or backward came in between.
"""

from __future__ import annotations

import torch

from mtp_cli.mtp.run_state import current_run_state


class _CurrentRunScale(type(torch.autograd.Function)):
    """`MTPLossAutoScaler.main_loss_backward_scale` is the current run's scale."""

    @property
    def main_loss_backward_scale(cls) -> torch.Tensor | float:
        return current_run_state().loss_scale

    @main_loss_backward_scale.setter
    def main_loss_backward_scale(cls, value: torch.Tensor | float) -> None:
        current_run_state().loss_scale = value


class MTPLossAutoScaler(torch.autograd.Function, metaclass=_CurrentRunScale):
    """Identity on `output`; backward seeds `mtp_loss` with its run's loss scale."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, mtp_loss: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(mtp_loss)
        ctx.run_state = current_run_state()
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        (mtp_loss,) = ctx.saved_tensors
        scale = ctx.run_state.loss_scale
        if isinstance(scale, torch.Tensor):
            scale = scale.to(device=mtp_loss.device, dtype=mtp_loss.dtype)
        return grad_output, torch.ones_like(mtp_loss) * scale

    @staticmethod
    def set_loss_scale(scale: torch.Tensor | float) -> None:
        """The optimizer's loss scale / number of micro-batches (per-token mode: the loss scale),
        for the current run."""
        current_run_state().set_loss_scale(scale)
