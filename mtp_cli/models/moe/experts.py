"""`SequentialMLP`: the routed experts, one MLP each, keyed by their GLOBAL expert index.

Stored layout (Megatron-Core's SequentialMLP names): `experts.local_experts.{e}.linear_fc1.weight`
`[2 x moe_ffn, h]` (`[gate; up]` with SwiGLU) and `...linear_fc2.weight` `[h, moe_ffn]`, one tensor
per expert, `e` the global index. A rank of an expert-parallel group builds only its experts but
names them globally, so checkpoints reshard by name to any expert-parallel size and an expert
missing from a checkpoint is named by its index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mtp_cli.config.schema import ModelConfig
from mtp_cli.models.mlp import MLP, MLPSubmodules
from mtp_cli.nn.module_spec import register_module


@dataclass
class ExpertsSubmodules:
    linear_fc1: Any = None
    linear_fc2: Any = None


@register_module(submodules=ExpertsSubmodules)
class SequentialMLP(nn.Module):
    """The experts `expert_indices` of one MoE layer, computed one after another."""

    def __init__(self, config: ModelConfig, submodules: ExpertsSubmodules,
                 expert_indices: Sequence[int] | None = None) -> None:
        super().__init__()
        indices = list(range(config.num_moe_experts) if expert_indices is None
                       else expert_indices)
        mlp_submodules = MLPSubmodules(submodules.linear_fc1, submodules.linear_fc2)
        self.local_experts = nn.ModuleDict({
            str(e): MLP(config, mlp_submodules, ffn_hidden_size=config.moe_ffn_hidden_size)
            for e in indices
        })

    @property
    def expert_indices(self) -> list[int]:
        return [int(e) for e in self.local_experts]

    def forward(self, tokens: torch.Tensor, tokens_per_expert: list[int],
                probs: torch.Tensor) -> torch.Tensor:
        """`tokens [N, h]` grouped by expert (`tokens_per_expert` rows each, in index order).

        Without autograd (decoding: a token or a few reach only top-k experts) an expert with no
        tokens is skipped; with it every expert runs, so each takes part in backward."""
        skip_idle = not torch.is_grad_enabled()
        outputs = [
            expert(chunk, per_token_scale=weights)
            for expert, chunk, weights, count in zip(
                self.local_experts.values(), tokens.split(tokens_per_expert),
                probs.split(tokens_per_expert), tokens_per_expert, strict=True)
            if count or not skip_idle
        ]
        return torch.cat(outputs, dim=0) if outputs else tokens.new_zeros(0, tokens.shape[-1])
