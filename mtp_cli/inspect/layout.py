"""The model layout a checkpoint implies: D, N, hidden and vocab sizes, ties.

From the stored spec when there is one; otherwise read from the tensor names and shapes, so a
Megatron-Core or Hugging Face state dict with no spec still gets its depths and tie relations.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mtp_cli.config.schema import RunSpec
from mtp_cli.inspect.checkpoint import TensorInfo
from mtp_cli.inspect.names import Naming, detect_naming, transformer_layer_spelling
from mtp_cli.plan.run_plan import mtp_depths


@dataclass
class Layout:
    naming: Naming
    depths: int  # D
    depth_source: str  # "spec" | "keys"
    present_depths: list[int]  # MTP depth indices found among the tensors
    main_layers: int | None  # N
    hidden_size: int | None
    vocab_size: int | None
    tied_output: bool | None  # output layer = word embedding
    repeated_layer: bool | None
    transformer_layer_name: str | None  # transformer_layer | mtp_model_layer
    # where D came from, for people: "--spec FILE", "the spec stored in meta.json", "the keys"
    depth_origin: str = "the keys"

    def as_dict(self) -> dict[str, Any]:
        return {
            "naming": self.naming.style,
            "mtp_depths": self.depths,
            "mtp_depths_source": self.depth_source,
            "mtp_depths_from": self.depth_origin,
            "mtp_depths_present": [self.naming.depth_prefix(d).rstrip(".")
                                   for d in self.present_depths],
            "num_layers": self.main_layers,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "tied_output": self.tied_output,
            "use_repeated_layer": self.repeated_layer,
            "mtp_transformer_layer_name": self.transformer_layer_name,
        }


def infer_layout(tensors: Mapping[str, TensorInfo], spec: RunSpec | None,
                 spec_origin: str = "the spec") -> Layout:
    """The layout from `spec` (described as `spec_origin`) when given, else from the keys."""
    main_layers = spec.model.num_layers if spec else None
    naming = detect_naming(tensors, main_layers)
    parts = [naming.part_of(name) for name in tensors]
    present = sorted({p.index for p in parts if p.kind == "mtp" and p.index is not None})
    decoder = {p.index for p in parts if p.kind == "decoder" and p.index is not None}
    if main_layers is None:
        main_layers = naming.main_layers if naming.style == "huggingface" else (
            max(decoder) + 1 if decoder else None)
    embedding = tensors.get(naming.embedding_weight) or tensors.get(naming.output_weight)
    vocab, hidden = embedding.shape if embedding and len(embedding.shape) == 2 else (None, None)
    if spec is not None:
        return Layout(
            naming, mtp_depths(spec), "spec", present, main_layers, spec.model.hidden_size,
            spec.model.vocab_size, spec.model.share_embeddings_and_output_weights,
            spec.mtp.use_repeated_layer, transformer_layer_spelling(tensors), spec_origin,
        )
    tied = naming.output_weight not in tensors if naming.embedding_weight in tensors else None
    return Layout(
        naming, max(present) + 1 if present else 0, "keys", present, main_layers, hidden, vocab,
        tied, None, transformer_layer_spelling(tensors), "the keys (no spec stored or given)",
    )
