"""What `mtp build` reports about a model: parameter counts by part, shared weights.

Counting rules (documented in the README): each part counts every parameter it uses, so a tied
output layer counts the word embedding again and a repeated MTP layer counts in every depth;
`total` is the sum of the parts, `unique` counts each tensor once, `shared = total - unique`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from mtp_cli.models.gpt import GPTModel


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
        }


def count_parameters(model: GPTModel) -> ParameterCounts:
    """Parameter counts of a (whole or stage) model, built on any device, meta included."""
    embedding = _numel(list(model.embedding.parameters())) if model.embedding is not None else 0
    decoder = _numel(list(model.decoder.parameters()))
    mtp: list[int] = []
    if model.mtp is not None:
        mtp = [_numel(list(model.mtp.layer_for_depth(d).parameters()))
               for d in range(model.mtp.num_depths)]
    output = model.output_weight().numel() if model.stage.loss else 0
    return ParameterCounts(embedding, decoder, mtp, output, _numel(list(model.parameters())))
