"""`SharedExpertMLP`: the experts every token goes through (DeepSeek-V3: one of width 2048).

An MLP of width `moe_shared_expert_intermediate_size` (all shared experts fused into one, as
Megatron-Core stores them: `mlp.shared_experts.linear_fc1/linear_fc2`). Its output is added to
the routed experts' output.
"""

from __future__ import annotations

from mtp_cli.config.schema import ModelConfig
from mtp_cli.models.mlp import MLP, MLPSubmodules
from mtp_cli.nn.module_spec import register_module


@register_module(submodules=MLPSubmodules)
class SharedExpertMLP(MLP):
    """A dense MLP with the shared experts' width."""

    def __init__(self, config: ModelConfig, submodules: MLPSubmodules) -> None:
        super().__init__(config, submodules,
                         ffn_hidden_size=config.moe_shared_expert_intermediate_size)
