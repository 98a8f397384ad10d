"""`TopKRouter`: the gate of an MoE layer (Megatron-Core's names and semantics, fp32 math).

Parameters: `weight [E, h]` (and `bias [E]` with `add_bias_linear`), always fp32. Buffers:
`expert_bias [E]` (persistent: checkpoints carry it) and `local_tokens_per_expert [E]` (the
counts since the last bias update, not saved) when `moe_router_enable_expert_bias` is on.

Forward: fp32 logits; the z-loss attached to the logits; top-k routing (`routing.topk_routing`);
the balancing loss attached to the probs; token counts added for the bias update. Losses only in
training with gradients enabled, as in Megatron-Core. A router whose `layer_number` exceeds
`num_layers` belongs to an MTP layer: it records in slot `layer_number - 1` like Megatron-Core's
MTP routers, and a repeated MTP layer (applied at D depths) scales its balancing loss by 1/D
(`mtp_repeats`, set by `configure_moe_routers`).

Split sequences (context parallel; sequence parallel, where each tensor rank routes its slice):
the router sees only its rank's tokens, so, as Megatron-Core's router does over its `tp_cp_group`,
the balancing loss uses the token counts summed over `groups.tp_cp_group` (through the model's
`ModelComm`) and that group's token total, and the z-loss coefficient is divided by the group
size. Each rank's losses are then its share of the whole sequence's: their gradients, summed over
the group by the gradient reduction, and their recorded values, summed over it by the trainer's
metrics, are the single-process ones. `groups` is the model's `ParallelGroups` (`GPTModel` shares
it with every router); without parallel layout the group is None and nothing moves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtp_cli.config.schema import ModelConfig
from mtp_cli.models.moe.aux_losses import AuxLossScale, MoEAuxLossAutoScaler, MoELayerMetrics
from mtp_cli.models.moe.routing import (
    scores_for_aux_loss,
    switch_load_balancing_loss,
    topk_routing,
    z_loss,
)
from mtp_cli.nn.comm import ParallelGroups, comm_for
from mtp_cli.nn.module_spec import register_module

BALANCING_LOSS_NAMES = {"aux_loss": "load_balancing_loss",
                        "seq_aux_loss": "seq_load_balancing_loss"}


@register_module()
class TopKRouter(nn.Module):
    """Scores every token against every expert and picks each token's top-k experts."""

    def __init__(self, config: ModelConfig, layer_number: int = 1) -> None:
        super().__init__()
        experts = config.num_moe_experts
        self.config = config
        self.layer_number = layer_number
        self.is_mtp_layer = layer_number > config.num_layers
        self.mtp_repeats = 1  # depths a repeated MTP layer is applied at
        self.weight = nn.Parameter(torch.empty(experts, config.hidden_size, dtype=torch.float32))
        self.bias = (nn.Parameter(torch.empty(experts, dtype=torch.float32))
                     if config.add_bias_linear else None)
        if config.moe_router_enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(experts, dtype=torch.float32))
            self.register_buffer("local_tokens_per_expert",
                                 torch.zeros(experts, dtype=torch.float32), persistent=False)
        else:
            self.expert_bias = None
            self.local_tokens_per_expert = None
        self.aux_loss_scale = AuxLossScale()
        self.metrics = MoELayerMetrics()
        self.groups = ParallelGroups()  # the model's, shared by `GPTModel`

    def _token_group_size(self) -> int:
        """Ranks whose tokens together make this replica's sequences (1: all are here)."""
        group = self.groups.tp_cp_group
        return 1 if group is None else comm_for(group, self.groups.comm).size(group)

    def _global_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """`counts` summed over `tp_cp_group` (Megatron's `get_tokens_per_expert_and_token_count`;
        no gradient flows through a routing map)."""
        group = self.groups.tp_cp_group
        if group is None:
            return counts
        return comm_for(group, self.groups.comm).all_reduce(counts.clone(), group)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[s, b, h]` -> (probs `[s*b, E]`, routing map `[s*b, E]`), tokens in `[s, b]` order."""
        seq_len, batch, hidden = hidden_states.shape
        bias = self.bias.float() if self.bias is not None else None
        logits = F.linear(hidden_states.reshape(-1, hidden).float(), self.weight.float(), bias)
        training = self.training and torch.is_grad_enabled()
        config = self.config
        if training and config.moe_z_loss_coeff is not None:
            logits = self._attach_z_loss(logits)
        probs, routing_map, _ = topk_routing(
            logits, config.moe_router_topk, score_function=config.moe_router_score_function,
            pre_softmax=config.moe_router_pre_softmax, num_groups=config.moe_router_num_groups,
            group_topk=config.moe_router_group_topk,
            scaling_factor=config.moe_router_topk_scaling_factor, expert_bias=self.expert_bias,
        )
        if training and self.balancing_loss_enabled:
            probs = self._attach_balancing_loss(logits, probs, seq_len, batch)
        if training:
            self.metrics.count_tokens(routing_map)
        if self.local_tokens_per_expert is not None and torch.is_grad_enabled() \
                and not self.metrics.muted:  # counted once per micro-batch, not on recompute
            with torch.no_grad():
                self.local_tokens_per_expert += routing_map.sum(dim=0)
        return probs, routing_map

    @property
    def balancing_loss_enabled(self) -> bool:
        return (self.config.moe_router_load_balancing_type != "none"
                and self.config.moe_aux_loss_coeff > 0)

    def _attach(self, activation: torch.Tensor, loss: torch.Tensor, tokens: int) -> torch.Tensor:
        """Per-token mode: times this rank's tokens and the group size, as Megatron-Core does
        (the step divides by the global tokens, which count every rank of the group)."""
        if self.aux_loss_scale.per_token:
            loss = loss * (tokens * self._token_group_size())
        return MoEAuxLossAutoScaler.apply(activation, loss, self.aux_loss_scale)

    def _attach_z_loss(self, logits: torch.Tensor) -> torch.Tensor:
        """Megatron: the gradient carries the loss once per call; the logged value is divided
        by the repeats of a repeated MTP layer. Over a split sequence each rank's mean is divided
        by the group size, so the group's sum is the mean over the whole sequence."""
        share = z_loss(logits, 1.0) / self._token_group_size()
        logits = self._attach(logits, share * self.config.moe_z_loss_coeff, logits.shape[0])
        self.metrics.record("z_loss", share / self.mtp_repeats)
        return logits

    def _attach_balancing_loss(self, logits: torch.Tensor, probs: torch.Tensor, seq_len: int,
                               batch: int) -> torch.Tensor:
        """aux_loss over the micro-batch's tokens, or seq_aux_loss per sequence averaged over
        the batch: each sequence's (expert) columns become columns of their own. Counts and the
        token total are those of the whole sequences (summed over `tp_cp_group`); the scores are
        this rank's, so the result is this rank's share of the loss."""
        config = self.config
        topk, experts = config.moe_router_topk, config.num_moe_experts
        kind = config.moe_router_load_balancing_type
        aux_map, scores = scores_for_aux_loss(logits, topk, config.moe_router_score_function)
        if kind == "seq_aux_loss":
            scores, aux_map = scores.reshape(seq_len, -1), aux_map.reshape(seq_len, -1)
        counts = self._global_counts(aux_map.sum(dim=0).float())
        total_tokens = aux_map.shape[0] * self._token_group_size()
        raw = switch_load_balancing_loss(scores, counts, total_tokens, topk, experts, 1.0)
        if kind == "seq_aux_loss":
            raw = raw / batch
        raw = raw / self.mtp_repeats
        self.metrics.record(BALANCING_LOSS_NAMES[kind], raw)
        return self._attach(probs, raw * config.moe_aux_loss_coeff, seq_len * batch)
