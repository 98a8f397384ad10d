"""Transformer Engine modules behind the backend slots (imported only when built).

Unfused TE norms and linears, so every weight maps one to one onto the local backend's
(`weight` `[out, in]`, `bias`, norm `weight`/`bias`): a state dict loads into either backend.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mtp_cli.config.schema import ModelConfig
from mtp_cli.errors import UserError
from mtp_cli.models.attention import DotProductAttention
from mtp_cli.nn.module_spec import register_module

TE_INSTALL_HINT = (
    "backend 'te' needs NVIDIA Transformer Engine, which needs a CUDA GPU: "
    "pip install 'mtp-cli[te]' (transformer-engine[pytorch]) on a machine with CUDA, "
    "or set model.backend=local"
)


def import_transformer_engine() -> Any:
    """`transformer_engine.pytorch`, or a UserError saying how to get it."""
    try:
        import transformer_engine.pytorch as te  # type: ignore[import-not-found]
    except Exception as error:  # ImportError, or a broken CUDA install raising at import
        raise UserError(f"{TE_INSTALL_HINT} ({type(error).__name__}: {error})") from None
    return te


def _te_device(config: ModelConfig) -> str:
    default = torch.get_default_device()
    return "meta" if default.type == "meta" else "cuda"


@register_module("TENorm")
def te_norm(config: ModelConfig, hidden_size: int) -> nn.Module:
    """TE LayerNorm or RMSNorm, picked from `model.normalization`."""
    te = import_transformer_engine()
    norm = te.RMSNorm if config.normalization == "RMSNorm" else te.LayerNorm
    return norm(hidden_size, eps=config.layernorm_epsilon, device=_te_device(config))


class _TELinear:
    scaled_init = False

    def __new__(cls, input_size: int, output_size: int, *, config: ModelConfig,
                bias: bool = True) -> nn.Module:
        te = import_transformer_engine()
        linear = te.Linear(input_size, output_size, bias=bias, device=_te_device(config))
        linear.scaled_init = cls.scaled_init
        return linear


@register_module("TEColumnParallelLinear")
class TEColumnParallelLinear(_TELinear):
    """te.Linear standing in for a column-parallel linear."""


@register_module("TERowParallelLinear")
class TERowParallelLinear(_TELinear):
    """te.Linear standing in for a row-parallel linear (feeds the residual: scaled init)."""

    scaled_init = True


@register_module("TEDotProductAttention")
class TEDotProductAttention(nn.Module):
    """TE's fused attention for plain causal batches; packed or custom masks use SDPA."""

    def __init__(self, config: ModelConfig, layer_number: int = 1,
                 attn_mask_type: str = "causal") -> None:
        super().__init__()
        te = import_transformer_engine()
        self.fused = te.DotProductAttention(
            config.num_attention_heads, config.kv_channels,
            num_gqa_groups=config.num_query_groups, attention_dropout=config.attention_dropout,
            qkv_format="sbhd", attn_mask_type="causal", layer_number=layer_number,
        )
        self.fallback = DotProductAttention(config, layer_number, attn_mask_type)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None = None,
                packed_seq_params: Any = None) -> torch.Tensor:
        if attention_mask is not None or packed_seq_params is not None or not query.is_cuda:
            return self.fallback(query, key, value, attention_mask, packed_seq_params)
        return self.fused(query.contiguous(), key.contiguous(), value.contiguous())
