"""`MoELayer` (router, routed experts, shared experts) and the MLP slot that picks it per layer.

`MoELayer` computes `shared_experts(x) + combine(experts(dispatch(x, router(x))))`, dropless:
every token reaches all of its top-k experts. The dispatcher is a plain attribute
(`token_dispatcher`), the seam expert parallel replaces.

`MoEOrDenseMLP` fills a transformer layer's `mlp` slot in MoE models: it builds its `moe`
submodule on the layers `moe_layer_freq` marks and its `dense` one elsewhere, and MTP layers
(layer numbers past `num_layers`) like the decoder's last layer, as Megatron-Core builds the MTP
layer from the decoder's last layer spec. It returns the built module itself, so state-dict names
are Megatron's: `decoder.layers.{i}.mlp.router.weight`, `...mlp.linear_fc1.weight` (dense).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mtp_cli.config.moe_fields import is_moe_layer
from mtp_cli.config.schema import ModelConfig
from mtp_cli.errors import Problem
from mtp_cli.models.mlp import mlp_spec
from mtp_cli.models.moe.dispatcher import LocalTokenDispatcher, TokenDispatcher
from mtp_cli.nn.module_spec import ModuleSpec, SpecTreeError, build_module, register_module
from mtp_cli.nn.sharding import TensorParallelRule


@dataclass
class MoESubmodules:
    router: Any = None
    experts: Any = None
    shared_experts: Any = field(default=None, metadata={"optional": True})


@register_module(submodules=MoESubmodules)
class MoELayer(nn.Module):
    """A mixture-of-experts MLP. `layer_number` is global and 1-based (MTP layers: N + k)."""

    takes_layer_number = True  # TransformerLayer passes its layer number to the mlp slot

    def __init__(self, config: ModelConfig, submodules: MoESubmodules,
                 layer_number: int = 1) -> None:
        super().__init__()
        self.layer_number = layer_number
        self.router = build_module(submodules.router, config=config, layer_number=layer_number)
        expert_indices = list(range(config.num_moe_experts))
        self.experts = build_module(submodules.experts, config=config,
                                    expert_indices=expert_indices)
        self.shared_experts = None
        if config.moe_shared_expert_intermediate_size is not None:
            if submodules.shared_experts is None:
                raise SpecTreeError(problems=[Problem(
                    "model.moe_shared_expert_intermediate_size is set but the MoELayer spec has "
                    "no shared_experts", key="modules.decoder_layer",
                    hint="add shared_experts: {module: SharedExpertMLP, ...}")])
            self.shared_experts = build_module(submodules.shared_experts, config=config)
        self.token_dispatcher: TokenDispatcher = LocalTokenDispatcher(expert_indices)

    def tensor_parallel_rule(self) -> TensorParallelRule:
        """Under expert tensor parallel the dispatcher enters and leaves the experts' region
        (the experts themselves split as MLPs); otherwise nothing changes here."""
        return TensorParallelRule(expert_dispatcher="token_dispatcher")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`[s, b, h]` -> `[s, b, h]`."""
        shared = self.shared_experts(hidden_states) if self.shared_experts is not None else None
        probs, routing_map = self.router(hidden_states)
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        dispatched = self.token_dispatcher.dispatch(flat, probs, routing_map)
        expert_output = self.experts(dispatched.tokens, dispatched.tokens_per_expert,
                                     dispatched.probs)
        output = self.token_dispatcher.combine(expert_output, dispatched, flat.shape[0])
        output = output.view_as(hidden_states)
        return output if shared is None else output + shared


@dataclass
class MoEOrDenseSubmodules:
    dense: Any = None
    moe: Any = None


def mlp_layer_is_moe(config: ModelConfig, layer_number: int) -> bool:
    """Whether 1-based layer `layer_number` (MTP layers: past `num_layers`) is an MoE layer."""
    index = min(layer_number, config.num_layers) - 1
    return is_moe_layer(config.moe_layer_freq, index)


@register_module("MoEOrDenseMLP", submodules=MoEOrDenseSubmodules)
def moe_or_dense_mlp(config: ModelConfig, submodules: MoEOrDenseSubmodules,
                     layer_number: int = 1) -> nn.Module:
    """`moe` on MoE layers (by `moe_layer_freq`), `dense` elsewhere."""
    if mlp_layer_is_moe(config, layer_number):
        return build_module(submodules.moe, config=config, layer_number=layer_number)
    return build_module(submodules.dense, config=config)


moe_or_dense_mlp.takes_layer_number = True


def moe_layer_spec(config: ModelConfig) -> ModuleSpec:
    """Megatron's local MoE spec: TopKRouter, SequentialMLP experts, SharedExpertMLP."""
    linears = {"linear_fc1": ModuleSpec("backend.column_parallel_linear"),
               "linear_fc2": ModuleSpec("backend.row_parallel_linear")}
    submodules: dict[str, ModuleSpec] = {
        "router": ModuleSpec("TopKRouter"),
        "experts": ModuleSpec("SequentialMLP", submodules=dict(linears)),
    }
    if config.moe_shared_expert_intermediate_size is not None:
        submodules["shared_experts"] = ModuleSpec("SharedExpertMLP", submodules=dict(linears))
    return ModuleSpec("MoELayer", submodules=submodules)


def moe_mlp_spec(config: ModelConfig) -> ModuleSpec:
    """The `mlp` slot of an MoE model's layers: MoE or dense by `moe_layer_freq`."""
    return ModuleSpec("MoEOrDenseMLP", submodules={"dense": mlp_spec(),
                                                   "moe": moe_layer_spec(config)})
