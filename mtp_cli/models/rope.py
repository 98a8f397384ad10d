"""Rotary position embedding as the model builds it: partial RoPE for GQA, YaRN for MLA.

`rotary_embedding_for(config)` is the one place that decides the rotary module:
- GQA: plain RoPE over the first `kv_channels x rotary_percent` channels of each head (GLM-4.5
  rotates half); the other channels pass through (`apply_rotary_pos_emb` splits on the angles'
  width, as Megatron-Core does).
- MLA: RoPE over the decoupled `qk_pos_emb_head_dim` channels, YaRN-scaled with
  `rope_type: yarn` (Megatron-Core's `YarnRotaryEmbedding`: frequencies interpolated between
  `beta_slow` and `beta_fast` rotations of `original_max_position_embeddings`).

The module returns angles `[s, b, 1, dim]`; the attention applies them. YaRN's two temperatures
live in the attention: `yarn_concentration_factor` multiplies cos and sin (Megatron's `mscale`
returned with the embedding), and `mla_softmax_scale` corrects the softmax scale by
`mscale(factor, mscale_all_dim)^2`.
"""

from __future__ import annotations

import math

import torch

from mtp_cli.config.attention_fields import rotary_dim
from mtp_cli.config.schema import ModelConfig
from mtp_cli.models.embedding import RotaryEmbedding


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature `0.1 * mscale * ln(scale) + 1` (1 when not extending)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _correction_dim(rotations: float, dim: int, base: float, max_positions: int) -> float:
    """The channel index whose wavelength makes `rotations` turns over `max_positions`."""
    return dim * math.log(max_positions / (rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_inverse_frequencies(dim: int, base: float, factor: float, original_max_positions: int,
                             beta_fast: float, beta_slow: float) -> torch.Tensor:
    """Per-pair inverse frequencies: extrapolated (unchanged) above `beta_fast` rotations,
    interpolated (divided by `factor`) below `beta_slow`, a linear ramp between."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    extrapolated = 1.0 / (base ** exponents)
    interpolated = 1.0 / (factor * base ** exponents)
    low = math.floor(_correction_dim(beta_fast, dim, base, original_max_positions))
    high = math.ceil(_correction_dim(beta_slow, dim, base, original_max_positions))
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a ramp of zero width
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp  # 1: extrapolate, 0: interpolate
    return interpolated * (1 - keep) + extrapolated * keep


class YarnRotaryEmbedding(RotaryEmbedding):
    """`RotaryEmbedding` with YaRN's frequencies (same forward: angles from position ids)."""

    def __init__(self, config: ModelConfig) -> None:
        dim = config.qk_pos_emb_head_dim
        super().__init__(dim, config.rotary_base)
        self.inv_freq.copy_(yarn_inverse_frequencies(
            dim, config.rotary_base, config.rotary_scaling_factor,
            config.original_max_position_embeddings, config.beta_fast, config.beta_slow))


def rotary_embedding_for(config: ModelConfig) -> RotaryEmbedding | None:
    """The model's rotary module (None without RoPE)."""
    if config.position_embedding != "rope":
        return None
    if config.multi_latent_attention and config.rope_type == "yarn":
        return YarnRotaryEmbedding(config)
    return RotaryEmbedding(rotary_dim(config), config.rotary_base)


def yarn_concentration_factor(config: ModelConfig) -> float:
    """What cos and sin are multiplied by: `mscale(f, mscale) / mscale(f, mscale_all_dim)`."""
    if config.rope_type != "yarn":
        return 1.0
    factor = config.rotary_scaling_factor
    return yarn_get_mscale(factor, config.mscale) / yarn_get_mscale(factor, config.mscale_all_dim)


def mla_softmax_scale(config: ModelConfig) -> float:
    """MLA's softmax scale: `mscale(f, mscale_all_dim)^2 / sqrt(qk_head_dim + rope dim)`.

    As Megatron-Core computes it, whatever `rope_type` (with `mscale_all_dim: 0` it is 1/sqrt(d)).
    """
    mscale = yarn_get_mscale(config.rotary_scaling_factor, config.mscale_all_dim)
    return mscale * mscale / math.sqrt(config.qk_head_dim + config.qk_pos_emb_head_dim)
