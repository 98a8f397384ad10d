"""The MoE metrics of a training step, as Megatron-Core 0.19 logs them, for one run.

Each router records its auxiliary losses (`load_balancing_loss`, `seq_load_balancing_loss`,
`z_loss`, each the loss divided by its coefficient) and its tokens per expert on itself, summed
over the step's micro-batches (`mtp_cli.models.moe.run_state`). After the step `MoEStepMetrics`
reads them from this rank's model chunks and reduces them like Megatron-Core's
`MoEMetricsTracker.report`:

- per layer, a vector of `num_layers + mtp_num_layers` slots per loss (MTP routers record in
  slot `num_layers + k`), summed over the pipeline ranks (each holds other layers; Megatron's
  `force_initialize` makes every rank's vector the same length) and averaged over the data x
  context ranks (`needs_dp_avg`; expert parallel is carved from those ranks, so it is covered);
- over a split sequence (context parallel, or sequence parallel's tensor ranks: the router's
  `tp_cp_group`) each rank recorded its share of the losses, summed over that group first
  (Megatron's `reduce_group`); token counts are summed over the sequence-parallel tensor ranks
  (`tp_group`, given only under sequence parallel), so each token counts once;
- the logged value: `sum over layers x loss_scale / num_moe_layers`, `loss_scale` =
  1 / micro-batches and `num_moe_layers` the MoE decoder layers plus every MTP layer
  (`_count_moe_layers`);
- `load_imbalance` (ours; Megatron names no such scalar): the step's tokens per expert summed over
  the data x context ranks, then per layer max over experts / mean over experts, and the largest
  of those over the layers (1.0 = perfectly balanced; `E / topk` = every token on the same
  experts).

The state is the routers' own (no process-global tracker), so two runs in one process do not mix.
Every rank calls `collect` (it runs collectives); every rank gets the same values.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mtp_cli.config.moe_fields import count_moe_layers
from mtp_cli.config.schema import RunSpec
from mtp_cli.models.moe.router import BALANCING_LOSS_NAMES
from mtp_cli.models.moe.run_state import (
    clear_moe_metrics,
    moe_layer_metrics,
    summarize_moe_metrics,
)
from mtp_cli.plan.run_plan import RunPlan

LOAD_IMBALANCE = "load_imbalance"
MOE_METRIC_NAMES = ("load_balancing_loss", "seq_load_balancing_loss", "z_loss", LOAD_IMBALANCE)


def logged_loss_names(spec: RunSpec) -> list[str]:
    """The aux losses the routers of `spec` record in training (the same on every rank)."""
    model = spec.model
    names = []
    if (model.moe_router_load_balancing_type != "none" and model.moe_aux_loss_coeff > 0):
        names.append(BALANCING_LOSS_NAMES[model.moe_router_load_balancing_type])
    if model.moe_z_loss_coeff is not None:
        names.append("z_loss")
    return names


class MoEStepMetrics:
    """Reads, reduces and clears the routers' records once per step (`collect`)."""

    def __init__(self, plan: RunPlan, *, pp_group: Any = None, dp_cp_group: Any = None,
                 tp_cp_group: Any = None, tp_group: Any = None,
                 device: torch.device | None = None) -> None:
        model = plan.spec.model
        self.enabled = model.num_moe_experts is not None
        self.names = logged_loss_names(plan.spec) if self.enabled else []
        self.slots = model.num_layers + plan.depths
        self.experts = model.num_moe_experts or 0
        self.num_moe_layers = count_moe_layers(model, plan.depths)
        self.pp_group, self.dp_cp_group = pp_group, dp_cp_group
        self.tp_cp_group, self.tp_group = tp_cp_group, tp_group
        self.device = device or torch.device("cpu")

    def collect(self, chunks: Iterable[nn.Module], num_microbatches: int) -> dict[str, float]:
        """This step's `load_balancing_loss` / `seq_load_balancing_loss` / `z_loss` (those the
        spec turns on) and `load_imbalance`; {} for a dense model. Clears the records."""
        if not self.enabled:
            return {}
        chunks = list(chunks)
        losses, tokens = self._pack(moe_layer_metrics(chunks))
        clear_moe_metrics(chunks)
        if self.tp_cp_group is not None:  # each rank's share of a split sequence's losses
            dist.all_reduce(losses, group=self.tp_cp_group)
        if self.tp_group is not None:  # sequence parallel: each tensor rank routed a slice
            dist.all_reduce(tokens, group=self.tp_group)
        if self.pp_group is not None:  # disjoint layers: the sum collects them
            dist.all_reduce(losses, group=self.pp_group)
            dist.all_reduce(tokens, group=self.pp_group)
        if self.dp_cp_group is not None:
            dist.all_reduce(losses, group=self.dp_cp_group)  # gloo has no AVG
            losses /= dist.get_world_size(self.dp_cp_group)
            dist.all_reduce(tokens, group=self.dp_cp_group)
        per_layer: dict[int, dict[str, Any]] = {}
        for slot in range(self.slots):
            entry: dict[str, Any] = {name: float(losses[i, slot])
                                     for i, name in enumerate(self.names)}
            if tokens[slot].sum() > 0:
                entry["tokens_per_expert"] = tokens[slot].cpu()
            per_layer[slot + 1] = entry
        return summarize_moe_metrics(per_layer, max(self.num_moe_layers, 1),
                                     1.0 / num_microbatches)

    def _pack(self, per_layer: dict[int, dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """`[losses, slots]` and `[slots, experts]` float64 tensors (zeros where this rank has no
        MoE layer), in the layout every rank shares."""
        losses = torch.zeros(len(self.names), self.slots, dtype=torch.float64,
                             device=self.device)
        tokens = torch.zeros(self.slots, self.experts, dtype=torch.float64, device=self.device)
        for layer_number, entry in per_layer.items():
            slot = layer_number - 1
            for i, name in enumerate(self.names):
                losses[i, slot] += entry.get(name, 0.0)
            if "tokens_per_expert" in entry:
                tokens[slot] += entry["tokens_per_expert"].to(tokens)
        return losses, tokens
