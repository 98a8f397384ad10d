"""Tensor names of the two conventions we read, and what part of the model each one is.

Megatron-Core (and `mtp train`): `embedding.*`, `decoder.layers.{i}.*`, `decoder.final_layernorm.*`,
`mtp.layers.{k}.*` (the transformer layer as `transformer_layer.*`, or Megatron-Core 0.19's
in-memory `mtp_model_layer.*`), `output_layer.weight` (absent when tied).

Hugging Face DeepSeek-V3: `model.embed_tokens.*`, `model.layers.{i}.*` for i < N, the MTP depths
as `model.layers.{N+k}.*` (recognised by `enorm`/`hnorm`/`eh_proj`/`shared_head`), `model.norm.*`,
`lm_head.weight`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

LEGACY_LAYER = "mtp_model_layer"
MTP_ONLY_SUFFIXES = ("enorm.", "hnorm.", "eh_proj.", "shared_head.")

_MEGATRON_MTP = re.compile(r"^mtp\.layers\.(\d+)\.(.+)$")
_MEGATRON_DECODER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Part:
    """Where a tensor belongs: `kind` in embedding/decoder/mtp/output_layer/other."""

    kind: str
    index: int | None = None  # decoder layer or MTP depth index (0-based)
    rest: str = ""  # name inside the layer or depth

    @property
    def key(self) -> str:
        """A stable id for tables and JSON: `mtp_1` is depth 1 (`mtp.layers.0`)."""
        if self.kind == "mtp":
            return f"mtp_{self.index + 1}"
        return self.kind


@dataclass(frozen=True)
class Naming:
    """A naming convention, with N (main decoder layers) where the names need it."""

    style: str  # "megatron" | "huggingface"
    main_layers: int | None = None

    # --- names of the main weights and of the MTP depths' copies of them -------------------
    @property
    def embedding_weight(self) -> str:
        return "embedding.word_embeddings.weight" if self.style == "megatron" \
            else "model.embed_tokens.weight"

    @property
    def output_weight(self) -> str:
        return "output_layer.weight" if self.style == "megatron" else "lm_head.weight"

    def depth_prefix(self, depth: int) -> str:
        if self.style == "megatron":
            return f"mtp.layers.{depth}."
        return f"model.layers.{(self.main_layers or 0) + depth}."

    def embedding_copy(self, depth: int) -> str:
        tail = "embedding.word_embeddings.weight" if self.style == "megatron" \
            else "embed_tokens.weight"
        return self.depth_prefix(depth) + tail

    def output_copy(self, depth: int) -> str:
        tail = "output_layer.weight" if self.style == "megatron" else "shared_head.head.weight"
        return self.depth_prefix(depth) + tail

    def copy_tails(self) -> tuple[str, str]:
        if self.style == "megatron":
            return "embedding.word_embeddings.weight", "output_layer.weight"
        return "embed_tokens.weight", "shared_head.head.weight"

    # --- classification ---------------------------------------------------------------------
    def part_of(self, name: str) -> Part:
        if self.style == "megatron":
            return _megatron_part(name)
        return self._hf_part(name)

    def _hf_part(self, name: str) -> Part:
        if name.startswith("model.embed_tokens."):
            return Part("embedding", rest=name)
        if name.startswith("lm_head."):
            return Part("output_layer", rest=name)
        if name.startswith("model.norm."):
            return Part("decoder", rest=name)
        match = _HF_LAYER.match(name)
        if match:
            layer, rest = int(match.group(1)), match.group(2)
            if self.main_layers is not None and layer >= self.main_layers:
                return Part("mtp", layer - self.main_layers, rest)
            return Part("decoder", layer, rest)
        return Part("other", rest=name)


def _megatron_part(name: str) -> Part:
    match = _MEGATRON_MTP.match(name)
    if match:
        rest = match.group(2)
        if rest.startswith(LEGACY_LAYER + "."):
            rest = "transformer_layer." + rest[len(LEGACY_LAYER) + 1:]
        return Part("mtp", int(match.group(1)), rest)
    match = _MEGATRON_DECODER.match(name)
    if match:
        return Part("decoder", int(match.group(1)), match.group(2))
    if name.startswith("decoder."):
        return Part("decoder", rest=name[len("decoder."):])
    if name.startswith("embedding."):
        return Part("embedding", rest=name)
    if name.startswith("output_layer."):
        return Part("output_layer", rest=name)
    return Part("other", rest=name)


def canonical(name: str) -> str:
    """Megatron name with the MTP transformer layer spelled `transformer_layer`."""
    return name.replace(f".{LEGACY_LAYER}.", ".transformer_layer.")


def detect_naming(names: Iterable[str], main_layers: int | None = None) -> Naming:
    """The convention of `names`; for Hugging Face names also N (first MTP layer index)."""
    names = list(names)
    hf = any(n.startswith(("model.embed_tokens.", "model.layers.", "lm_head.")) for n in names)
    if not hf:
        return Naming("megatron")
    if main_layers is None:
        mtp_layers = {int(m.group(1)) for n in names if (m := _HF_LAYER.match(n))
                      and m.group(2).startswith(MTP_ONLY_SUFFIXES)}
        layers = {int(m.group(1)) for n in names if (m := _HF_LAYER.match(n))}
        main_layers = min(mtp_layers) if mtp_layers else (max(layers) + 1 if layers else 0)
    return Naming("huggingface", main_layers)


def transformer_layer_spelling(names: Iterable[str]) -> str | None:
    """`transformer_layer` or `mtp_model_layer` (Megatron-Core 0.19 in memory), if any."""
    found = None
    for name in names:
        match = _MEGATRON_MTP.match(name)
        if match:
            head = match.group(2).split(".", 1)[0]
            if head in ("transformer_layer", LEGACY_LAYER):
                found = head
                if head == LEGACY_LAYER:
                    return head
    return found
