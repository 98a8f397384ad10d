"""Token and position embeddings, and rotary position embedding (RoPE)."""

from __future__ import annotations

import torch
from torch import nn

from mtp_cli.config.schema import ModelConfig
from mtp_cli.nn.module_spec import register_module


@register_module()
class LanguageModelEmbedding(nn.Module):
    """`word_embeddings(ids) + position_embeddings(positions)`, returned as `[s, b, h]`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = (
            nn.Embedding(config.max_position_embeddings, config.hidden_size)
            if config.position_embedding == "learned_absolute"
            else None
        )
        self.embedding_dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        embeddings = self.word_embeddings(input_ids)  # [b, s, h]
        if self.position_embeddings is not None:
            embeddings = embeddings + self.position_embeddings(position_ids)
        return self.embedding_dropout(embeddings.transpose(0, 1).contiguous())  # [s, b, h]


class RotaryEmbedding(nn.Module):
    """Non-interleaved RoPE as Megatron-Core applies it: `t*cos + rotate_half(t)*sin`.

    Frequencies come from `position_ids`, so packed documents (positions restarting at 0) and
    context-parallel shards (the positions of the local tokens) rotate correctly.
    """

    def __init__(self, kv_channels: int, rotary_base: float) -> None:
        """`kv_channels`: the rotated channels of a head (all of it, or a share: partial RoPE)."""
        super().__init__()
        exponents = torch.arange(0, kv_channels, 2, dtype=torch.float32) / kv_channels
        self.register_buffer("inv_freq", 1.0 / (rotary_base**exponents), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        """`[b, s]` positions -> `[s, b, 1, kv_channels]` angles (halves repeated)."""
        freqs = position_ids.transpose(0, 1).float()[..., None] * self.inv_freq  # [s, b, d/2]
        return torch.cat([freqs, freqs], dim=-1)[:, :, None, :]


def apply_rotary_pos_emb(t: torch.Tensor, freqs: torch.Tensor, *,
                         interleaved_pairs: bool = False, mscale: float = 1.0) -> torch.Tensor:
    """Rotate `[s, b, heads, d]` by `[s, b, 1, r]` angles (Megatron's non-interleaved form).

    Only the first `r` channels rotate (partial RoPE); the rest pass through. With
    `interleaved_pairs` (Megatron's `mla_rotary_interleaved`) the rotated channels are read as
    pairs `(x0, x1), (x2, x3), ...` and come out as `[x0', x2', ..., x1', x3', ...]`. `mscale`
    multiplies cos and sin (YaRN's concentration factor).
    """
    rotary = freqs.shape[-1]
    t, passed = t[..., :rotary], t[..., rotary:]
    if interleaved_pairs:
        t = torch.cat([t[..., 0::2], t[..., 1::2]], dim=-1)
    first, second = t.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    cos, sin = freqs.cos(), freqs.sin()
    if mscale != 1.0:  # (multiplying by 1.0 changes nothing but costs two ops per call)
        cos, sin = cos * mscale, sin * mscale
    cos, sin = cos.to(t.dtype), sin.to(t.dtype)
    out = t * cos + rotated * sin
    return torch.cat([out, passed], dim=-1) if passed.shape[-1] else out
