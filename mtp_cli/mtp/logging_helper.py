"""`MTPLossLoggingHelper`: per-depth MTP losses and acceptance counts for the logs.

The model saves each micro-batch's normalised depth loss into a class-level tracker; once per
iteration the trainer reduces it (sum over the pipeline so every stage sees the MTP stage's
values, average over data x context parallel), writes `mtp_{i} loss` and acceptance rates, adds
the losses into the console's log-interval totals (accumulating, never overwriting) and cleans
the tracker. The logged loss is the mean over micro-batches of each micro-batch's normalised
loss, averaged over data x context parallel ranks: it is not token-weighted.

Megatron keeps the tracker on the class; here `MTPLossLoggingHelper.tracker` (and `cumulative`)
is the current run's (`mtp_cli.mtp.run_state`), so a second model in the process - with its own
`MTPRunState` - cannot disturb it. The reductions go through the `ModelComm` of their groups.
"""

from __future__ import annotations

from typing import Any

import torch

from mtp_cli.mtp.run_state import current_run_state
from mtp_cli.nn.comm import Group, comm_for

_DISTILL = ("distill", "distill_count")  # `mtp.distill`'s tracker rows


class _CurrentRunTracker(type):
    """`MTPLossLoggingHelper.tracker` / `.cumulative` read and write the current run's state."""

    @property
    def tracker(cls) -> dict[str, Any]:
        return current_run_state().tracker

    @tracker.setter
    def tracker(cls, value: dict[str, Any]) -> None:
        current_run_state().tracker = value

    @property
    def cumulative(cls) -> dict[str, torch.Tensor]:
        return current_run_state().cumulative

    @cumulative.setter
    def cumulative(cls, value: dict[str, torch.Tensor]) -> None:
        current_run_state().cumulative = value


class MTPLossLoggingHelper(metaclass=_CurrentRunTracker):
    """The current run's tracker: `values`, `count`, `correct`, `total` (tensors of length D);
    with `mtp.distill` also `distill` and `distill_count` (each depth's KL, logged as
    `mtp_{k}_distill`)."""

    @staticmethod
    def _slot(name: str, num_layers: int, device: torch.device) -> torch.Tensor:
        tracker = MTPLossLoggingHelper.tracker
        if name not in tracker or tracker[name].numel() != num_layers:
            tracker[name] = torch.zeros(num_layers, device=device)
        return tracker[name]

    @staticmethod
    def save_loss_to_tracker(loss: torch.Tensor, layer_number: int | None, num_layers: int,
                             reduce_group: Group = None, avg_group: Group = None) -> None:
        """Add one micro-batch's normalised loss of depth `layer_number` (0-based)."""
        if layer_number is None:
            return
        tracker = MTPLossLoggingHelper.tracker
        MTPLossLoggingHelper._slot("values", num_layers, loss.device)[layer_number] += (
            loss.detach().float()
        )
        MTPLossLoggingHelper._slot("count", num_layers, loss.device)[layer_number] += 1
        tracker["reduce_group"] = reduce_group
        tracker["avg_group"] = avg_group

    @staticmethod
    def save_acceptance_to_tracker(correct: torch.Tensor, total: torch.Tensor,
                                   layer_number: int, num_layers: int) -> None:
        """Add one micro-batch's acceptance counts (argmax hits and valid targets) of a depth."""
        MTPLossLoggingHelper._slot("correct", num_layers, correct.device)[layer_number] += (
            correct.detach().float()
        )
        MTPLossLoggingHelper._slot("total", num_layers, total.device)[layer_number] += (
            total.detach().float()
        )

    @staticmethod
    def save_distill_to_tracker(kl: torch.Tensor, layer_number: int, num_layers: int) -> None:
        """Add one micro-batch's normalised distillation KL of depth `layer_number` (0-based)."""
        MTPLossLoggingHelper._slot("distill", num_layers, kl.device)[layer_number] += (
            kl.detach().float()
        )
        MTPLossLoggingHelper._slot("distill_count", num_layers, kl.device)[layer_number] += 1

    @staticmethod
    def ensure_tracker(num_layers: int, device: torch.device, reduce_group: Group = None,
                       avg_group: Group = None) -> None:
        """Create zeroed slots and set the groups on every rank, including pipeline stages
        that compute no MTP loss, so that `reduce_loss_in_tracker`'s collectives match."""
        if num_layers <= 0:
            return
        for name in ("values", "count", "correct", "total"):
            MTPLossLoggingHelper._slot(name, num_layers, device)
        MTPLossLoggingHelper.tracker["reduce_group"] = reduce_group
        MTPLossLoggingHelper.tracker["avg_group"] = avg_group

    @staticmethod
    def clean_loss_in_tracker() -> None:
        """Zero the tracker for the next iteration."""
        tracker = MTPLossLoggingHelper.tracker
        for name in ("values", "count", "correct", "total", *_DISTILL):
            if name in tracker:
                tracker[name].zero_()
        tracker["reduce_group"] = None
        tracker["avg_group"] = None

    @staticmethod
    def reduce_loss_in_tracker() -> None:
        """Sum over `reduce_group` (pipeline), then average losses / sum counts over `avg_group`.

        After this, `values` holds each depth's mean over micro-batches (averaged over the
        data x context parallel group), and `correct` / `total` the summed counts.
        """
        tracker = MTPLossLoggingHelper.tracker
        if "values" not in tracker:
            return
        reduce_group, avg_group = tracker.get("reduce_group"), tracker.get("avg_group")
        # the distillation rows ride along (zeros without it) so every rank's collective matches
        stats = torch.stack([tracker[n] if n in tracker else torch.zeros_like(tracker["values"])
                             for n in ("values", "count", "correct", "total", *_DISTILL)])
        comm_for(reduce_group).all_reduce(stats, reduce_group)
        values = stats[0] / stats[1].clamp(min=1)
        distill = stats[4] / stats[5].clamp(min=1)
        avg_comm = comm_for(avg_group)
        avg_comm.all_reduce(values, avg_group, "avg")
        avg_comm.all_reduce(distill, avg_group, "avg")
        avg_comm.all_reduce(stats[2:4], avg_group)
        tracker["values"], tracker["count"] = values, torch.ones_like(values)
        tracker["correct"], tracker["total"] = stats[2].clone(), stats[3].clone()
        tracker["distill"], tracker["distill_count"] = distill, stats[5].clone()

    @staticmethod
    def track_mtp_metrics(iteration: int, writer: Any = None, wandb_writer: Any = None,
                          total_loss_dict: dict[str, Any] | None = None) -> dict[str, float]:
        """Reduce, write `mtp_{i} loss` and acceptance rates, accumulate, clean. Returns them."""
        MTPLossLoggingHelper.reduce_loss_in_tracker()
        tracker = MTPLossLoggingHelper.tracker
        if "values" not in tracker:
            return {}
        values = tracker["values"].double().cpu()
        correct, total = tracker["correct"].double().cpu(), tracker["total"].double().cpu()
        cumulative = MTPLossLoggingHelper.cumulative
        if cumulative.get("correct") is None or cumulative["correct"].numel() != values.numel():
            cumulative["correct"] = torch.zeros_like(values)
            cumulative["total"] = torch.zeros_like(values)
        cumulative["correct"] += correct
        cumulative["total"] += total
        metrics: dict[str, float] = {}
        for i in range(values.numel()):
            metrics[f"mtp_{i + 1} loss"] = float(values[i])
            metrics[f"mtp_{i + 1}_acceptance_rate"] = float(
                100.0 * correct[i] / total[i].clamp(min=1)
            )
            metrics[f"mtp_{i + 1}_cumulative_acceptance_rate"] = float(
                100.0 * cumulative["correct"][i] / cumulative["total"][i].clamp(min=1)
            )
            if float(tracker["distill_count"][i]) > 0:
                metrics[f"mtp_{i + 1}_distill"] = float(tracker["distill"][i])
        for name, value in metrics.items():
            if writer is not None:
                writer.add_scalar(name, value, iteration)
            if total_loss_dict is not None and name.endswith(" loss"):
                total_loss_dict[name] = total_loss_dict.get(name, 0.0) + value
        if wandb_writer is not None:
            wandb_writer.log(metrics, step=iteration)
        MTPLossLoggingHelper.clean_loss_in_tracker()
        return metrics

    @staticmethod
    def state_dict() -> dict[str, torch.Tensor]:
        """The cumulative acceptance counts, kept in checkpoints so a resume continues them."""
        return {k: v.clone() for k, v in MTPLossLoggingHelper.cumulative.items() if v is not None}

    @staticmethod
    def load_state_dict(state: dict[str, torch.Tensor]) -> None:
        MTPLossLoggingHelper.cumulative = {k: v.clone().double() for k, v in state.items()}

    @staticmethod
    def reset() -> None:
        """Forget the current run's tracker and cumulative counts (a new run)."""
        current_run_state().reset()
