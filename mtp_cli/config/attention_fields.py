"""Attention keys of `model:` beyond plain GQA: partial RoPE, QK norms, multi-latent attention.

`ModelConfig` inherits these fields; their cross-field rules are
`mtp_cli.plan.rules.attention_rules`. Names and defaults are Megatron-Core's (`TransformerConfig` and
`MLATransformerConfig`), except `rope_type`, whose default here is `rope` because the same
schema describes GQA models.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

PositiveInt = Annotated[int, Field(strict=True, ge=1)]

MLA_KEYS = ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim")
YARN_KEYS = ("rotary_scaling_factor", "original_max_position_embeddings", "beta_fast",
             "beta_slow", "mscale", "mscale_all_dim")


class AttentionFields(BaseModel):
    """GQA extras (GLM-4.5) and Megatron's multi-latent attention with YaRN (DeepSeek-V3)."""

    rotary_percent: Annotated[float, Field(gt=0, le=1)] = Field(
        default=1.0, description="Share of each head's channels RoPE rotates (GLM-4.5: 0.5); the "
        "rest pass through.")
    qk_layernorm: bool = Field(
        default=False, description="GQA: a norm on each query and key head before RoPE. MLA: the "
        "query and kv latent norms (q_layernorm, kv_layernorm).")
    multi_latent_attention: bool = Field(
        default=False, description="Multi-latent attention (DeepSeek-V2/V3) instead of GQA.")
    q_lora_rank: PositiveInt | None = Field(
        default=None, description="MLA: query compression rank; null = a full query projection.")
    kv_lora_rank: PositiveInt = Field(default=512, description="MLA: key/value latent rank.")
    qk_head_dim: PositiveInt = Field(
        default=128, description="MLA: per-head query/key channels without RoPE.")
    qk_pos_emb_head_dim: PositiveInt = Field(
        default=64, description="MLA: channels of the decoupled RoPE key, shared by all heads.")
    v_head_dim: PositiveInt = Field(default=128, description="MLA: per-head value channels.")
    rope_type: Literal["rope", "yarn"] = Field(
        default="rope", description="MLA: plain RoPE or YaRN-scaled RoPE for the rotary channels.")
    rotary_scaling_factor: Annotated[float, Field(ge=1)] = Field(
        default=40.0, description="YaRN: context extension factor.")
    original_max_position_embeddings: PositiveInt = Field(
        default=4096, description="YaRN: context length the model was pretrained at.")
    beta_fast: Annotated[float, Field(gt=0)] = Field(
        default=32.0, description="YaRN: rotations above which frequencies are kept.")
    beta_slow: Annotated[float, Field(gt=0)] = Field(
        default=1.0, description="YaRN: rotations below which frequencies are interpolated.")
    mscale: Annotated[float, Field(ge=0)] = Field(
        default=1.0, description="YaRN: attention temperature of the rotary channels.")
    mscale_all_dim: Annotated[float, Field(ge=0)] = Field(
        default=0.0, description="YaRN: temperature applied to the whole softmax scale, squared "
        "(DeepSeek-V3: 1.0).")


def changed_keys(model: Any, given: set[str], keys: tuple[str, ...]) -> list[str]:
    """The `keys` the spec sets to something other than their default (a spec dumped with
    every default filled in loads again)."""
    return [k for k in keys if k in given and getattr(model, k) != type(model).model_fields[k].default]


def rotary_dim(model: Any) -> int:
    """Channels of each head RoPE rotates: MLA's decoupled key, or a share of a GQA head."""
    if model.multi_latent_attention:
        return model.qk_pos_emb_head_dim
    return int(model.kv_channels * model.rotary_percent)

