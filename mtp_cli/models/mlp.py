"""The feed-forward block: linear_fc1 -> GELU or SwiGLU -> linear_fc2."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtp_cli.config.schema import ModelConfig
from mtp_cli.nn.module_spec import ModuleSpec, build_module, register_module
from mtp_cli.nn.sharding import LinearSplit, TensorParallelRule


@dataclass
class MLPSubmodules:
    linear_fc1: Any = None
    linear_fc2: Any = None


@register_module(submodules=MLPSubmodules)
class MLP(nn.Module):
    """With SwiGLU, linear_fc1 holds `[gate; up]`: the first half goes through SiLU.

    `ffn_hidden_size` overrides the config's (MoE experts and shared experts have their own).
    """

    def __init__(self, config: ModelConfig, submodules: MLPSubmodules,
                 ffn_hidden_size: int | None = None) -> None:
        super().__init__()
        self.gated = config.activation == "swiglu"
        ffn = ffn_hidden_size or config.ffn_hidden_size
        fc1_rows = ffn * (2 if self.gated else 1)
        self.linear_fc1 = build_module(submodules.linear_fc1, config.hidden_size, fc1_rows,
                                       config=config, bias=config.add_bias_linear)
        self.linear_fc2 = build_module(submodules.linear_fc2, ffn, config.hidden_size,
                                       config=config, bias=config.add_bias_linear)

    def tensor_parallel_rule(self) -> TensorParallelRule:
        """`linear_fc1` by rows (SwiGLU's `[gate; up]` halves apart), `linear_fc2` by input
        columns; a routed expert's only under expert tensor parallel."""
        fc1 = "gated_column" if self.gated else "column"
        return TensorParallelRule(linears=(LinearSplit("linear_fc1", fc1),
                                           LinearSplit("linear_fc2", "row")))

    def forward(self, hidden_states: torch.Tensor,
                per_token_scale: torch.Tensor | None = None) -> torch.Tensor:
        """`per_token_scale [tokens]` (an expert's routing weights) scales each token's output,
        applied after the activation as Megatron-Core does (a bias of linear_fc2 scaled too)."""
        intermediate = self.linear_fc1(hidden_states)
        if self.gated:
            gate, up = intermediate.chunk(2, dim=-1)
            intermediate = F.silu(gate) * up
        else:
            intermediate = F.gelu(intermediate)
        if per_token_scale is None:
            return self.linear_fc2(intermediate)
        scale = per_token_scale.unsqueeze(-1)
        output = self.linear_fc2((intermediate * scale).to(intermediate.dtype))
        bias = getattr(self.linear_fc2, "bias", None)
        return output if bias is None else output + ((scale - 1) * bias).to(output.dtype)


def mlp_spec() -> ModuleSpec:
    return ModuleSpec(
        module="MLP",
        submodules={
            "linear_fc1": ModuleSpec("backend.column_parallel_linear"),
            "linear_fc2": ModuleSpec("backend.row_parallel_linear"),
        },
    )
