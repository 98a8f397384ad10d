"""What `mtp build` reports about a model: parameter counts by part, shared weights.

Counting rules (documented in the README): each part counts every parameter it uses, so a tied
output layer counts the word embedding again and a repeated MTP layer counts in every depth;
`total` is the sum of the parts, `unique` counts each tensor once, `shared = total - unique`.

Mixture-of-experts models (MTP excluded from both, as users quote them):
`experts` = the routed experts' parameters of the decoder layers;
`activated` = embedding + decoder + output layer - sum over MoE decoder layers of
(num_moe_experts - moe_router_topk) x (parameters of one routed expert): what one token uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from mtp_cli.gpt import GPTModel
from mtp_cli.models.moe.layer import MoELayer


def _numel(params: list[nn.Parameter]) -> int:
    seen: set[int] = set()
    total = 0
    for param in params:
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    return total


@dataclass
class ParameterCounts:
    embedding: int
    decoder: int
    mtp: list[int]
    output_layer: int
    unique: int
    experts: int = 0  # routed experts of the decoder layers
    unused_experts: int = 0  # routed experts a token does not use (decoder layers)

    @property
    def total(self) -> int:
        return self.embedding + self.decoder + sum(self.mtp) + self.output_layer

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "unique": self.unique,
            "shared": self.total - self.unique,
            "embedding": self.embedding,
            "decoder": self.decoder,
            "mtp": list(self.mtp),
            "output_layer": self.output_layer,
            "experts": self.experts,
            "activated": self.activated,
        }

    @property
    def activated(self) -> int:
        """Main-model parameters one token uses (the MTP depths excluded)."""
        return self.embedding + self.decoder + self.output_layer - self.unused_experts


def count_parameters(model: GPTModel) -> ParameterCounts:
    """Parameter counts of a (whole or stage) model, built on any device, meta included."""
    embedding = _numel(list(model.embedding.parameters())) if model.embedding is not None else 0
    decoder = _numel(list(model.decoder.parameters()))
    mtp: list[int] = []
    if model.mtp is not None:
        mtp = [_numel(list(model.mtp.layer_for_depth(d).parameters()))
               for d in range(model.mtp.num_depths)]
    output = model.output_weight().numel() if model.stage.loss else 0
    experts, unused = routed_expert_parameters(model.decoder)
    return ParameterCounts(embedding, decoder, mtp, output, _numel(list(model.parameters())),
                           experts=experts, unused_experts=unused)


def routed_expert_parameters(module: nn.Module) -> tuple[int, int]:
    """(routed experts' parameters, those a token leaves unused) in `module`'s MoE layers."""
    total = unused = 0
    for layer in module.modules():
        if isinstance(layer, MoELayer):
            experts = list(layer.experts.local_experts.values())
            per_expert = _numel(list(experts[0].parameters())) if experts else 0
            config = layer.router.config
            total += per_expert * len(experts)
            unused += per_expert * (config.num_moe_experts - config.moe_router_topk)
    return total, unused
