"""Layer norms. `WrappedTorchNorm` picks LayerNorm or RMSNorm from the config, like Megatron's."""

from __future__ import annotations

import torch
from torch import nn

from mtp_cli.config.schema import ModelConfig
from mtp_cli.nn.module_spec import register_module


@register_module("LayerNorm")
def layer_norm(config: ModelConfig, hidden_size: int) -> nn.Module:
    """torch LayerNorm (weight and bias) with the spec's epsilon."""
    return nn.LayerNorm(hidden_size, eps=config.layernorm_epsilon)


class RMSNorm(nn.RMSNorm):
    """torch's RMSNorm, computed in its weight's dtype and returned in the input's, as
    LayerNorm does under autocast: bf16 autocast hands it bf16 activations and an fp32 weight,
    which torch's fused kernel refuses with a warning on every call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None or x.dtype == self.weight.dtype:
            return super().forward(x)
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)


@register_module("RMSNorm")
def rms_norm(config: ModelConfig, hidden_size: int) -> nn.Module:
    """torch RMSNorm (weight only) with the spec's epsilon."""
    return RMSNorm(hidden_size, eps=config.layernorm_epsilon)


@register_module("WrappedTorchNorm")
def wrapped_torch_norm(config: ModelConfig, hidden_size: int) -> nn.Module:
    """The local backend's norm: `model.normalization` decides which one."""
    if config.normalization == "RMSNorm":
        return rms_norm(config, hidden_size)
    return layer_norm(config, hidden_size)


@register_module()
class IdentityOp(nn.Identity):
    """Stands in for any submodule to drop it (Megatron's IdentityOp): takes any arguments."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__()

    def forward(self, x, *args, **kwargs):
        return x
