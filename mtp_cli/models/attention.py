"""Causal self-attention with grouped queries, fused QKV laid out per query group.

`linear_qkv`'s output rows are, for each query group in turn, that group's query heads, then its
key head, then its value head: the layout of Megatron-Core, which keeps whole groups together
when the rows are split over tensor-parallel ranks.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtp_cli.config.schema import ModelConfig
from mtp_cli.errors import Problem
from mtp_cli.models.embedding import apply_rotary_pos_emb
from mtp_cli.models.inference import InferenceContext
from mtp_cli.nn.module_spec import ModuleSpec, SpecTreeError, build_module, register_module
from mtp_cli.nn.packed import PackedSeqParams
from mtp_cli.nn.sharding import LinearSplit, TensorParallelRule


def packed_document_mask(seq_len: int, packed_seq_params: PackedSeqParams,
                         device: torch.device) -> torch.Tensor:
    """`[s, s]` boolean mask, True = masked: causal and never across a document boundary.

    Positions past the last boundary form one more segment of their own, so no row is empty.
    """
    boundaries = packed_seq_params.attention_boundaries().to(device)
    positions = torch.arange(seq_len, device=device)
    document = torch.bucketize(positions, boundaries[1:], right=True)
    same_document = document[:, None] == document[None, :]
    causal = positions[None, :] <= positions[:, None]
    return ~(same_document & causal)


@register_module()
class DotProductAttention(nn.Module):
    """softmax(QK^T / sqrt(d)) V through `scaled_dot_product_attention`. No parameters."""

    def __init__(self, config: ModelConfig, layer_number: int = 1,
                 attn_mask_type: str = "causal", softmax_scale: float | None = None,
                 k_channels: int | None = None, v_channels: int | None = None) -> None:
        """`softmax_scale` defaults to 1/sqrt(query width); MLA passes its own (YaRN)."""
        super().__init__()
        self.dropout = config.attention_dropout
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None = None,
                packed_seq_params: PackedSeqParams | None = None) -> torch.Tensor:
        """`[s, b, heads, d]` query, `[s, b, groups, d]` key/value -> `[s, b, heads * d_v]`.

        Grouped queries go to SDPA as they are (`enable_gqa`: head i reads group
        i // (heads / groups)) except where copies are measurably faster (`grouped_kv`).
        Packed documents run one causal call per document (`packed_causal_attention`), so no
        `[s, s]` mask exists; an explicit `attention_mask` (the KV cache's) takes the masked
        call.
        """
        seq_len, batch = query.shape[:2]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, n, s, d]
        k, v, enable_gqa = grouped_kv(q, k, v)
        dropout = self.dropout if self.training else 0.0
        sdpa = functools.partial(F.scaled_dot_product_attention, dropout_p=dropout,
                                 scale=self.softmax_scale, enable_gqa=enable_gqa)
        if attention_mask is not None:  # Megatron's polarity: True = masked; SDPA: True = attend
            if packed_seq_params is not None:
                attention_mask = attention_mask | packed_document_mask(
                    seq_len, packed_seq_params, query.device)
            out = sdpa(q, k, v, attn_mask=~attention_mask)
        elif packed_seq_params is not None:
            out = packed_causal_attention(q, k, v, packed_seq_params, sdpa)
        else:
            out = sdpa(q, k, v, is_causal=True)
        return out.permute(2, 0, 1, 3).reshape(seq_len, batch, -1)


def grouped_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(key, value, enable_gqa) for SDPA on `[b, n, s, d]`: the groups as they are (GPU kernels
    and CPU inference read each group once), or, for a CPU step that needs gradients, repeated
    per head. torch 2.13's CPU backward of grouped SDPA is the slow one: 7x the copies' time at
    s = 4096 with 8 heads of one group (`benchmarks/attention_kernels.py`), while its forward
    matches them; so only there do the copies stay (the same numbers either way)."""
    heads, groups = q.shape[1], k.shape[1]
    if groups == heads:
        return k, v, False
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if q.device.type == "cpu" and needs_grad:
        return (k.repeat_interleave(heads // groups, dim=1),
                v.repeat_interleave(heads // groups, dim=1), False)
    return k, v, True


def document_spans(seq_len: int, packed_seq_params: PackedSeqParams) -> list[tuple[int, int]]:
    """`(start, end)` of each document in the (padded) sequence; positions past the last
    boundary form one more span, as in `packed_document_mask`."""
    edges = [int(e) for e in packed_seq_params.attention_boundaries().tolist() if 0 < e < seq_len]
    edges = [0, *sorted(set(edges)), seq_len]
    return [(start, end) for start, end in itertools.pairwise(edges) if end > start]


def packed_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            packed_seq_params: PackedSeqParams,
                            sdpa: Callable[..., torch.Tensor]) -> torch.Tensor:
    """Causal attention within each document: one SDPA call per document on `[b, n, s, d]`.

    The same numbers as the dense document mask (each query attends to the same keys with the
    same scale), in O(s) memory and with the fused causal kernels; 4 documents of 1024 take
    about 0.4x the time of one causal call over 4096 on CPU, where the mask took 2.1x.
    """
    spans = document_spans(q.shape[2], packed_seq_params)
    if len(spans) == 1:
        return sdpa(q, k, v, is_causal=True)
    return torch.cat([sdpa(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True)
                      for a, b in spans], dim=2)


@dataclass
class SelfAttentionSubmodules:
    linear_qkv: Any = None
    core_attention: Any = None
    linear_proj: Any = None
    # model.qk_layernorm: a norm over each query / key head (optional slots: omitted = none)
    q_layernorm: Any = field(default=None, metadata={"optional": True})
    k_layernorm: Any = field(default=None, metadata={"optional": True})


@register_module(submodules=SelfAttentionSubmodules)
class SelfAttention(nn.Module):
    """Fused QKV projection, RoPE, core attention, output projection."""

    def __init__(self, config: ModelConfig, submodules: SelfAttentionSubmodules,
                 layer_number: int = 1, attn_mask_type: str = "causal") -> None:
        super().__init__()
        self.layer_number = layer_number  # the key of this layer's entries in a KV cache
        self.head_dim = config.kv_channels
        self.heads_per_group = config.num_attention_heads // config.num_query_groups
        qkv_rows = (config.num_attention_heads + 2 * config.num_query_groups) * self.head_dim
        self.linear_qkv = build_module(
            submodules.linear_qkv, config.hidden_size, qkv_rows, config=config,
            bias=config.add_bias_linear or config.add_qkv_bias,
        )
        self.core_attention = build_module(
            submodules.core_attention, config=config, layer_number=layer_number,
            attn_mask_type=attn_mask_type,
        )
        self.linear_proj = build_module(
            submodules.linear_proj, config.num_attention_heads * self.head_dim,
            config.hidden_size, config=config, bias=config.add_bias_linear,
        )
        self.q_layernorm, self.k_layernorm = qk_norms(config, submodules, self.head_dim)

    def tensor_parallel_rule(self) -> TensorParallelRule:
        """Heads split: the fused QKV by rows (laid out per query group, so contiguous row
        blocks are whole groups), the output projection by input columns."""
        return TensorParallelRule(linears=(LinearSplit("linear_qkv", "column"),
                                           LinearSplit("linear_proj", "row")))

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                rotary_pos_emb: torch.Tensor | None = None,
                packed_seq_params: PackedSeqParams | None = None,
                inference_context: InferenceContext | None = None) -> torch.Tensor:
        """`inference_context` (decoding): keys and values go through the KV cache, which
        returns all cached positions and their mask (`mtp_cli.models.inference`)."""
        d, per_group = self.head_dim, self.heads_per_group
        qkv = self.linear_qkv(hidden_states)
        seq_len, batch = qkv.shape[:2]  # the whole sequence (sequence parallel gathers it)
        qkv = qkv.view(seq_len, batch, -1, (per_group + 2) * d)  # [s, b, local groups, ...]
        query, key, value = qkv.split([per_group * d, d, d], dim=-1)  # per query group
        query = query.reshape(seq_len, batch, -1, d)
        if self.q_layernorm is not None:
            query, key = self.q_layernorm(query), self.k_layernorm(key)
        if rotary_pos_emb is not None:
            query = apply_rotary_pos_emb(query, rotary_pos_emb)
            key = apply_rotary_pos_emb(key, rotary_pos_emb)
        if inference_context is not None:
            key, value, attention_mask = inference_context.update_kv(self.layer_number, key,
                                                                     value)
        context = self.core_attention(query, key, value, attention_mask, packed_seq_params)
        return self.linear_proj(context)


def qk_norms(config: ModelConfig, submodules: SelfAttentionSubmodules, head_dim: int
             ) -> tuple[nn.Module | None, nn.Module | None]:
    """The per-head query and key norms when `model.qk_layernorm` is on (Megatron's)."""
    if not config.qk_layernorm:
        return None, None
    if submodules.q_layernorm is None or submodules.k_layernorm is None:
        raise SpecTreeError(problems=[Problem(
            "model.qk_layernorm is true but the self_attention spec has no q_layernorm / "
            "k_layernorm", key="modules.decoder_layer", hint="add q_layernorm: "
            "backend.layer_norm and k_layernorm: backend.layer_norm")])
    return (build_module(submodules.q_layernorm, config=config, hidden_size=head_dim),
            build_module(submodules.k_layernorm, config=config, hidden_size=head_dim))


def self_attention_spec(qk_layernorm: bool = False) -> ModuleSpec:
    submodules = {
        "linear_qkv": ModuleSpec("backend.column_parallel_linear"),
        "core_attention": ModuleSpec("backend.core_attention"),
        "linear_proj": ModuleSpec("backend.row_parallel_linear"),
    }
    if qk_layernorm:
        submodules["q_layernorm"] = ModuleSpec("backend.layer_norm")
        submodules["k_layernorm"] = ModuleSpec("backend.layer_norm")
    return ModuleSpec(module="SelfAttention", params={"attn_mask_type": "causal"},
                      submodules=submodules)
