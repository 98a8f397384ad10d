"""Multi-latent attention (DeepSeek-V2/V3), with Megatron-Core's names and layout.

    q        = linear_q_up_proj(q_layernorm(linear_q_down_proj(x)))   or linear_q_proj(x)
    kv, k_pe = split(linear_kv_down_proj(x), [kv_lora_rank, rope])    k_pe: ONE head, shared
    kv       = linear_kv_up_proj(kv_layernorm(kv))                    per head [k_nope; v]
    q        = per head [q_nope; q_pe]
    query    = [q_nope; rope(q_pe)], key = [k_nope; rope(k_pe)] (k_pe broadcast to every head)
    out      = linear_proj(softmax(query key^T * scale) v)

Rotary layout: Megatron-Core's `mla_rotary_interleaved` (which is how MLA always rotates;
Megatron's config-level `rotary_interleaved` must stay false with MLA): the rotary channels of
`q_pe` and `k_pe` are taken as adjacent pairs `(x0, x1), (x2, x3), ...`, each pair turned by one
frequency. Hugging Face's DeepSeek-V3 with `rope_interleave: true` (its default) reads the
weights the same way, so the name mapping copies those rows unchanged; a checkpoint with
`rope_interleave: false` has its rotary rows permuted by the mapping (`mtp_cli.hf.mapping`).
The scale is `mla_softmax_scale` (YaRN's mscale_all_dim correction) and cos/sin carry YaRN's
concentration factor.

Tensor parallel (applied from outside, `mtp_cli.parallel.tensor_parallel`, as Megatron-Core's
TE spec lays MLA out) splits the up projections by heads and `linear_proj` by its input, and
keeps the down projections and latent norms whole on every rank; so the forward reads the head
count from the tensors, not the config. `k_pe` comes out of the (whole) down projection in the
activation layout but is read by every local head: `shared_key_region` is the seam where tensor
parallel moves it into the heads' region (identity on one device).

Decoding (`inference_context`) caches, per token and layer, only `[kv_layernorm(kv); rope(k_pe)]`
(`kv_lora_rank + qk_pos_emb_head_dim` values: 576 at DeepSeek-V3's dimensions, against 128 heads
x (192 + 128) for per-head keys and values) and attends to it with the up-projection absorbed into
the query and the output (`_attend_latent`), as DeepSeek's and vLLM's MLA decoders do. Decoding
runs on one device (the absorbed path reads the local heads' rows of `linear_kv_up_proj`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtp_cli.config.schema import ModelConfig
from mtp_cli.models.embedding import apply_rotary_pos_emb
from mtp_cli.models.inference import InferenceContext
from mtp_cli.models.rope import mla_softmax_scale, yarn_concentration_factor
from mtp_cli.nn.module_spec import ModuleSpec, build_module, register_module
from mtp_cli.nn.packed import PackedSeqParams
from mtp_cli.nn.sharding import LinearSplit, TensorParallelRule


@dataclass
class MLASelfAttentionSubmodules:
    linear_q_proj: Any = None
    linear_q_down_proj: Any = None
    linear_q_up_proj: Any = None
    linear_kv_down_proj: Any = None
    linear_kv_up_proj: Any = None
    core_attention: Any = None
    linear_proj: Any = None
    q_layernorm: Any = None
    kv_layernorm: Any = None


@register_module(submodules=MLASelfAttentionSubmodules)
class MLASelfAttention(nn.Module):
    """Low-rank query and key/value projections with a decoupled, shared RoPE key."""

    def __init__(self, config: ModelConfig, submodules: MLASelfAttentionSubmodules,
                 layer_number: int = 1, attn_mask_type: str = "causal") -> None:
        super().__init__()
        heads, h = config.num_attention_heads, config.hidden_size
        self.layer_number = layer_number  # the key of this layer's entries in a KV cache
        self.qk_head_dim, self.rope_dim = config.qk_head_dim, config.qk_pos_emb_head_dim
        self.v_head_dim, self.kv_lora_rank = config.v_head_dim, config.kv_lora_rank
        q_head_dim = self.qk_head_dim + self.rope_dim
        self.softmax_scale = mla_softmax_scale(config)

        def linear(spec: Any, rows_in: int, rows_out: int, bias: bool = False) -> nn.Module:
            return build_module(spec, rows_in, rows_out, config=config, bias=bias)

        self.compress_query = config.q_lora_rank is not None
        if self.compress_query:
            self.linear_q_down_proj = linear(submodules.linear_q_down_proj, h, config.q_lora_rank)
            self.linear_q_up_proj = linear(submodules.linear_q_up_proj, config.q_lora_rank,
                                           heads * q_head_dim)
            self.q_layernorm = build_module(submodules.q_layernorm, config=config,
                                            hidden_size=config.q_lora_rank)
        else:
            self.linear_q_proj = linear(submodules.linear_q_proj, h, heads * q_head_dim)
        self.linear_kv_down_proj = linear(submodules.linear_kv_down_proj, h,
                                          self.kv_lora_rank + self.rope_dim)
        self.linear_kv_up_proj = linear(submodules.linear_kv_up_proj, self.kv_lora_rank,
                                        heads * (self.qk_head_dim + self.v_head_dim))
        self.kv_layernorm = build_module(submodules.kv_layernorm, config=config,
                                         hidden_size=self.kv_lora_rank)
        self.core_attention = build_module(
            submodules.core_attention, config=config, layer_number=layer_number,
            attn_mask_type=attn_mask_type, softmax_scale=self.softmax_scale,
            k_channels=q_head_dim, v_channels=self.v_head_dim,
        )
        self.linear_proj = linear(submodules.linear_proj, heads * self.v_head_dim, h,
                                  bias=config.add_bias_linear)
        self.rotary_mscale = yarn_concentration_factor(config)
        # `[s, b, rope]` shared key -> the layout the query heads read (see the module doc)
        self.shared_key_region: Callable[[torch.Tensor], torch.Tensor] = _identity

    def tensor_parallel_rule(self) -> TensorParallelRule:
        """Megatron-Core's TE layout of MLA: the up projections split by heads (their rows are
        per head, so contiguous blocks are whole heads), the down projections and latent norms
        whole, the shared RoPE key in the heads' shared region, `linear_proj` row-parallel."""
        query = (LinearSplit("linear_q_down_proj", "duplicate"),
                 LinearSplit("linear_q_up_proj", "column")) if self.compress_query else \
            (LinearSplit("linear_q_proj", "column"),)
        return TensorParallelRule(
            linears=(*query, LinearSplit("linear_kv_down_proj", "duplicate"),
                     LinearSplit("linear_kv_up_proj", "column"),
                     LinearSplit("linear_proj", "row")),
            shared_across_heads="shared_key_region")

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                rotary_pos_emb: torch.Tensor | None = None,
                packed_seq_params: PackedSeqParams | None = None,
                inference_context: InferenceContext | None = None) -> torch.Tensor:
        """`[s, b, h]` -> `[s, b, h]`; `rotary_pos_emb` `[s, b, 1, rope]` angles.

        With an `inference_context` (decoding) the cache holds the latent `[kv; rope(k_pe)]`
        per token. A forward with positions cached before it attends in latent space
        (`_attend_latent`); the prefill (nothing cached yet) up-projects as training does.
        """
        if self.compress_query:
            q = self.linear_q_up_proj(self.q_layernorm(self.linear_q_down_proj(hidden_states)))
        else:
            q = self.linear_q_proj(hidden_states)
        seq_len, batch = q.shape[:2]  # the whole sequence (sequence parallel gathers it)
        q = q.view(seq_len, batch, -1, self.qk_head_dim + self.rope_dim)  # [s, b, local heads]
        q_nope, q_pe = q.split([self.qk_head_dim, self.rope_dim], dim=-1)
        kv_latent, k_pe = self.linear_kv_down_proj(hidden_states).split(
            [self.kv_lora_rank, self.rope_dim], dim=-1)
        kv_latent = self.kv_layernorm(kv_latent)
        # [s, b, 1, rope]: one key head shared by all query heads
        k_pe = self.shared_key_region(k_pe).unsqueeze(-2)
        if rotary_pos_emb is not None:
            q_pe = apply_rotary_pos_emb(q_pe, rotary_pos_emb, interleaved_pairs=True,
                                        mscale=self.rotary_mscale)
            k_pe = apply_rotary_pos_emb(k_pe, rotary_pos_emb, interleaved_pairs=True,
                                        mscale=self.rotary_mscale)
        if inference_context is not None and not inference_context.expanded_mla:
            cached, attention_mask = inference_context.update_latent(
                self.layer_number, torch.cat([kv_latent, k_pe.squeeze(-2)], dim=-1))
            if cached.shape[0] > seq_len:  # decoding: attend to the cache in latent space
                return self._attend_latent(q_nope, q_pe, cached, attention_mask)
            # prefill: the cache held nothing before; its latents are this forward's
            kv_latent, k_pe = cached.split([self.kv_lora_rank, self.rope_dim], dim=-1)
            k_pe, inference_context = k_pe.unsqueeze(-2), None
        kv = self.linear_kv_up_proj(kv_latent)
        kv = kv.view(*kv.shape[:2], -1, self.qk_head_dim + self.v_head_dim)
        k_nope, value = kv.split([self.qk_head_dim, self.v_head_dim], dim=-1)
        query = torch.cat([q_nope, q_pe], dim=-1)
        key = torch.cat([k_nope, k_pe.expand(-1, -1, q.shape[2], -1)], dim=-1)
        value = value.contiguous()
        if inference_context is not None:  # the expanded reference: per-head keys cached
            key, value, attention_mask = inference_context.update_kv(self.layer_number, key,
                                                                     value)
        context = self.core_attention(query, key, value, attention_mask, packed_seq_params)
        return self.linear_proj(context)

    def _attend_latent(self, q_nope: torch.Tensor, q_pe: torch.Tensor, cached: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
        """Attention over the cached `[S, b, kv_lora_rank + rope]` latents, no key or value
        up-projected (DeepSeek-V2's absorption, as vLLM's MLA decoder does).

        With `W_UK`, `W_UV` the key and value rows of `linear_kv_up_proj` per head:
        `q_nope . (W_UK c) = (W_UK^T q_nope) . c` and `sum_j p_j (W_UV c_j) = W_UV sum_j p_j c_j`,
        so each head's query moves into latent space, every head reads the one shared
        `[c; rope(k_pe)]` per token (multi-query attention, heads folded into the query rows)
        with the same scale, and the output leaves latent space through `W_UV`.
        """
        s, b, heads, _ = q_nope.shape
        rank, slots = self.kv_lora_rank, cached.shape[0]
        weight = self.linear_kv_up_proj.weight.view(heads, self.qk_head_dim + self.v_head_dim,
                                                    rank)
        w_uk, w_uv = weight.split([self.qk_head_dim, self.v_head_dim], dim=1)
        # [h, b * s, qk] @ [h, qk, r]: each head's query in latent space
        q_latent = q_nope.permute(2, 1, 0, 3).reshape(heads, b * s, -1) @ w_uk
        query = torch.cat([q_latent.view(heads, b, s, rank), q_pe.permute(2, 1, 0, 3)], dim=-1)
        query = query.transpose(0, 1).reshape(b, 1, heads * s, -1)  # row h * s + i
        key = cached.transpose(0, 1).unsqueeze(1)  # [b, 1, S, rank + rope]
        mask = mask[:, :, None].expand(-1, -1, heads, -1, -1).reshape(-1, 1, heads * s, slots)
        out = F.scaled_dot_product_attention(query, key, key[..., :rank], attn_mask=~mask,
                                             scale=self.softmax_scale)  # [b, 1, heads * s, r]
        # [h, b * s, r] @ [h, r, v]: back out of latent space, then [s, b, h * v]
        out = out.view(b, heads, s, rank).transpose(0, 1).reshape(heads, b * s, rank)
        context = (out @ w_uv.transpose(1, 2)).view(heads, b, s, -1).permute(2, 1, 0, 3)
        return self.linear_proj(context.reshape(s, b, heads * self.v_head_dim))


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def mla_self_attention_spec(qk_layernorm: bool) -> ModuleSpec:
    """Megatron's local MLA spec; the latent norms are `backend.layer_norm` with qk_layernorm."""
    norm = ModuleSpec("backend.layer_norm" if qk_layernorm else "IdentityOp")
    column = ModuleSpec("backend.column_parallel_linear")
    return ModuleSpec(
        module="MLASelfAttention",
        params={"attn_mask_type": "causal"},
        submodules={
            "linear_q_proj": column,
            "linear_q_down_proj": column,
            "linear_q_up_proj": column,
            "linear_kv_down_proj": column,
            "linear_kv_up_proj": column,
            "core_attention": ModuleSpec("backend.core_attention"),
            "linear_proj": ModuleSpec("backend.row_parallel_linear"),
            "q_layernorm": norm,
            "kv_layernorm": norm,
        },
    )
