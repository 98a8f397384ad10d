"""Attention keys of `model:` beyond plain GQA: partial RoPE, QK norms, multi-latent attention.

`ModelConfig` inherits these fields; `attention_problems` holds the cross-field rules as
`(key, message)` pairs. Names and defaults are Megatron-Core's (`TransformerConfig` and
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


def attention_problems(model: Any, given: set[str]) -> list[tuple[str, str]]:
    """Rules linking the attention keys (after kv_channels and query groups are filled in);
    `given`: the keys the spec sets."""
    if not model.multi_latent_attention:
        stray = changed_keys(model, given, (*MLA_KEYS, "rope_type", *YARN_KEYS))
        if stray:
            return [(stray[0], f"{stray[0]} is a multi-latent attention key; set "
                               "multi_latent_attention: true")]
        rotated = rotary_dim(model)
        if model.position_embedding == "rope" and model.rotary_percent == 1 and rotated % 2:
            return [("kv_channels", f"RoPE needs an even head width, got {model.kv_channels}")]
        if model.position_embedding == "rope" and (rotated == 0 or rotated % 2):
            return [("rotary_percent", f"RoPE needs an even, non-zero number of rotated channels; "
                                       f"kv_channels x rotary_percent = {model.kv_channels} x "
                                       f"{model.rotary_percent} gives {rotated}")]
        return []
    problems: list[tuple[str, str]] = []
    if model.position_embedding != "rope":
        problems.append(("position_embedding", "multi-latent attention rotates its decoupled key "
                         "itself: set position_embedding: rope"))
    if "kv_channels" in given and model.kv_channels != model.qk_head_dim + \
            model.qk_pos_emb_head_dim:
        problems.append(("kv_channels", "multi-latent attention has no kv_channels: its heads are "
                         "qk_head_dim + qk_pos_emb_head_dim (query, key) and v_head_dim (value)"))
    if "num_query_groups" in given and model.num_query_groups != model.num_attention_heads:
        problems.append(("num_query_groups", "multi-latent attention has one key/value head per "
                         "query head: leave num_query_groups out"))
    if model.qk_pos_emb_head_dim % 2:
        problems.append(("qk_pos_emb_head_dim", f"RoPE needs an even qk_pos_emb_head_dim, got "
                                                f"{model.qk_pos_emb_head_dim}"))
    if model.rotary_percent != 1.0:
        problems.append(("rotary_percent", "multi-latent attention rotates all "
                         "qk_pos_emb_head_dim channels: leave rotary_percent at 1"))
    if model.rope_type == "yarn" and model.beta_fast <= model.beta_slow:
        problems.append(("beta_fast", f"YaRN needs beta_fast ({model.beta_fast}) > beta_slow "
                                      f"({model.beta_slow})"))
    return problems
