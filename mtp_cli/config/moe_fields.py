"""The mixture-of-experts keys of `model:` (Megatron-Core's `moe_*` TransformerConfig fields).

`ModelConfig` inherits these fields; their cross-field rules are `mtp_cli.plan.rules.moe_rules`. Defaults are
Megatron-Core's. A model is MoE when `num_moe_experts` is set; `moe_layer_freq` then says which
decoder layers are MoE layers (the MTP layers are built like the last decoder layer).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

PositiveInt = Annotated[int, Field(strict=True, ge=1)]
Bit = Literal[0, 1]


class MoEFields(BaseModel):
    """Routed experts, shared experts, the router and its balancing losses."""

    num_moe_experts: PositiveInt | None = Field(
        default=None, description="Routed experts per MoE layer; null = a dense model.")
    moe_layer_freq: PositiveInt | list[Bit] = Field(
        default=1, description="Which decoder layers are MoE: an int N (layer i is MoE when "
        "i % N == 0) or a 0/1 list of num_layers entries, e.g. [0, 0, 0, 1, 1, ...].")
    moe_ffn_hidden_size: PositiveInt | None = Field(
        default=None, description="Inner width of each routed expert; default ffn_hidden_size.")
    moe_shared_expert_intermediate_size: PositiveInt | None = Field(
        default=None, description="Total inner width of the shared experts (n_shared x width); "
        "null = none.")
    moe_router_topk: PositiveInt = Field(default=2, description="Experts each token is sent to.")
    moe_router_score_function: Literal["softmax", "sigmoid"] = Field(
        default="softmax", description="Router score; sigmoid scores are normalised over the "
        "chosen top-k (k > 1).")
    moe_router_pre_softmax: bool = Field(
        default=False, description="softmax: score before choosing the top-k (else softmax over "
        "the chosen logits).")
    moe_router_topk_scaling_factor: Annotated[float, Field(gt=0)] | None = Field(
        default=None, description="Multiplies the top-k weights (DeepSeek-V3: 2.5).")
    moe_router_num_groups: PositiveInt | None = Field(
        default=None, description="Expert groups for group-limited routing (DeepSeek-V3: 8).")
    moe_router_group_topk: PositiveInt | None = Field(
        default=None, description="Groups each token may use (DeepSeek-V3: 4); groups ranked by "
        "the sum of their top (topk / group_topk) scores.")
    moe_router_enable_expert_bias: bool = Field(
        default=False, description="Auxiliary-loss-free balancing: a per-expert bias added to the "
        "scores for top-k selection only, updated after every step from the token counts.")
    moe_router_bias_update_rate: Annotated[float, Field(ge=0)] = Field(
        default=1e-3, description="Expert bias step: bias += rate * sign(mean count - count).")
    moe_router_load_balancing_type: Literal["aux_loss", "seq_aux_loss", "none"] = Field(
        default="aux_loss", description="aux_loss (per micro-batch), seq_aux_loss (per sequence, "
        "DeepSeek-V3) or none.")
    moe_aux_loss_coeff: Annotated[float, Field(ge=0)] = Field(
        default=0.0, description="Coefficient of the load-balancing loss (0 = off).")
    moe_z_loss_coeff: Annotated[float, Field(ge=0)] | None = Field(
        default=None, description="Coefficient of the router z-loss; null = off.")


def is_moe_layer(freq: int | list[int], layer_index: int) -> bool:
    """Whether 0-based decoder layer `layer_index` is an MoE layer (Megatron's rule)."""
    if isinstance(freq, int):
        return layer_index % freq == 0
    return bool(freq[layer_index])


def count_moe_layers(model: Any, mtp_layers: int) -> int:
    """MoE layers Megatron-Core averages its logged aux losses over: the MoE decoder layers
    plus every MTP layer."""
    if model.num_moe_experts is None:
        return 0
    moe = sum(is_moe_layer(model.moe_layer_freq, i) for i in range(model.num_layers))
    return moe + mtp_layers

