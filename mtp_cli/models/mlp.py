"""The feed-forward block: linear_fc1 -> GELU or SwiGLU -> linear_fc2."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtp_cli.config.schema import ModelConfig
from mtp_cli.nn.module_spec import ModuleSpec, build_module, register_module


@dataclass
class MLPSubmodules:
    linear_fc1: Any = None
    linear_fc2: Any = None


@register_module(submodules=MLPSubmodules)
class MLP(nn.Module):
    """With SwiGLU, linear_fc1 holds `[gate; up]`: the first half goes through SiLU."""

    def __init__(self, config: ModelConfig, submodules: MLPSubmodules) -> None:
        super().__init__()
        self.gated = config.activation == "swiglu"
        fc1_rows = config.ffn_hidden_size * (2 if self.gated else 1)
        self.linear_fc1 = build_module(submodules.linear_fc1, config.hidden_size, fc1_rows,
                                       config=config, bias=config.add_bias_linear)
        self.linear_fc2 = build_module(submodules.linear_fc2, config.ffn_hidden_size,
                                       config.hidden_size, config=config,
                                       bias=config.add_bias_linear)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        intermediate = self.linear_fc1(hidden_states)
        if self.gated:
            gate, up = intermediate.chunk(2, dim=-1)
            intermediate = F.silu(gate) * up
        else:
            intermediate = F.gelu(intermediate)
        return self.linear_fc2(intermediate)


def mlp_spec() -> ModuleSpec:
    return ModuleSpec(
        module="MLP",
        submodules={
            "linear_fc1": ModuleSpec("backend.column_parallel_linear"),
            "linear_fc2": ModuleSpec("backend.row_parallel_linear"),
        },
    )
