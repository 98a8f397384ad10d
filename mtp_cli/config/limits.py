"""How big a spec's model would be, computed from its numbers before anything is built.

A typo such as `model.num_layers=1000000000` or `hidden_size=10**12` would otherwise be found by
building: a billion modules (minutes and gigabytes, even on the meta device) or a tensor whose
byte count overflows. So every spec is held to two limits, checked arithmetically while it is
validated (Python integers: nothing overflows):

- at most `MAX_MODULES` (2 x 10^5) modules. DeepSeek-V3 at full size, about 45k expert linears
  in 58 mixture-of-experts layers, fits with room to spare;
- every tensor's element count below `MAX_TENSOR_ELEMENTS` (2^62), so that its byte count fits
  in the signed 64-bit sizes of every runtime.

The model is described as `Part`s: a kind of building block, how many copies the spec asks for,
the modules one copy holds and the shapes of its tensors. The counts are upper bounds of what
`build_model` creates (tests compare them with real meta-device builds). To extend the estimate,
add a part: a mixture-of-experts layer, for example, is a `Part` with `count` = the MoE layers,
`modules` = num_experts x (linear_fc1, linear_fc2, their MLP) + the router, and the experts'
fc1/fc2 shapes as its tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mtp_cli.config.schema import RunSpec

MAX_MODULES = 200_000
MAX_TENSOR_ELEMENTS = 2**62

# Modules one copy of each default tree builds (see `mtp build --show-spec`):
# TransformerLayer, input_layernorm, SelfAttention + linear_qkv/core_attention/linear_proj,
# pre_mlp_layernorm, MLP + linear_fc1/linear_fc2, hidden dropout.
DECODER_LAYER_MODULES = 11
# MultiTokenPredictionLayer, enorm, hnorm, eh_proj, final_layernorm; plus its transformer layer.
MTP_LAYER_OWN_MODULES = 5
# GPTModel, embedding (+ word embeddings, dropout, position table or rotary), decoder block (+
# its layer dict and final norm), output layer, MTP block (+ its layer dict).
MODEL_FIXED_MODULES = 13
# A user-given tree: each node is one module, and a layer may add a few helpers (dropouts).
HELPERS_PER_TREE = 2


@dataclass(frozen=True)
class Dim:
    """One dimension of a tensor and the spec key most responsible for its size."""

    size: int
    key: str


def dim(*factors: tuple[int, str]) -> Dim:
    """The product of `(size, key)` factors, blamed on the key of the largest factor."""
    return Dim(math.prod(size for size, _ in factors), max(factors, key=lambda f: f[0])[1])


@dataclass(frozen=True)
class TensorEstimate:
    name: str
    dims: tuple[Dim, ...]

    @property
    def numel(self) -> int:
        return math.prod(d.size for d in self.dims)

    @property
    def key(self) -> str:
        """The key of the largest dimension: where a too-large tensor comes from."""
        return max(self.dims, key=lambda d: d.size).key


@dataclass(frozen=True)
class Part:
    """`count` copies (set by `count_key`) of a block of `modules` modules and `tensors`."""

    name: str
    count: int
    count_key: str
    modules: int
    tensors: tuple[TensorEstimate, ...] = ()


class SizeLimitError(ValueError):
    """A spec whose model would exceed a limit; `key` is the spec key to change."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key, self.message = key, message


def tree_modules(tree: Any) -> int:
    """Modules a user-given `{module, params, submodules}` tree builds, at most."""
    if isinstance(tree, str):
        return 1
    if not isinstance(tree, dict):
        return 0
    children = tree.get("submodules")
    below = sum(tree_modules(c) for c in children.values()) if isinstance(children, dict) else 0
    return 1 + below


def _derived_key(value: int, key: str, default: int, source: str) -> str:
    """A size left at its default (derived from another key) is that key's doing."""
    return source if value == default else key


def _layer_tensors(spec: RunSpec, prefix: str) -> tuple[TensorEstimate, ...]:
    model = spec.model
    hidden = (model.hidden_size, "model.hidden_size")
    heads = (model.num_attention_heads, "model.num_attention_heads")
    groups = (2 * model.num_query_groups, "model.num_query_groups")
    kv = (model.kv_channels, _derived_key(
        model.kv_channels, "model.kv_channels",
        model.hidden_size // model.num_attention_heads, "model.hidden_size"))
    ffn = (model.ffn_hidden_size, _derived_key(
        model.ffn_hidden_size, "model.ffn_hidden_size", 4 * model.hidden_size,
        "model.hidden_size"))
    gated = (2 if model.activation == "swiglu" else 1, "model.activation")  # [gate; up]
    qkv_rows = Dim(heads[0] * kv[0] + groups[0] * kv[0],
                   max((heads, groups, kv), key=lambda f: f[0])[1])
    return (
        TensorEstimate(f"{prefix}self_attention.linear_qkv.weight", (qkv_rows, dim(hidden))),
        TensorEstimate(f"{prefix}self_attention.linear_proj.weight", (dim(hidden), dim(heads, kv))),
        TensorEstimate(f"{prefix}mlp.linear_fc1.weight", (dim(ffn, gated), dim(hidden))),
        TensorEstimate(f"{prefix}mlp.linear_fc2.weight", (dim(hidden), Dim(*ffn))),
        TensorEstimate(f"{prefix}input_layernorm.weight", (dim(hidden),)),
    )


def model_parts(spec: RunSpec) -> list[Part]:
    """The building blocks of `spec`'s model, with their counts, modules and tensor shapes."""
    model = spec.model
    hidden = (model.hidden_size, "model.hidden_size")
    vocab = (model.vocab_size, "model.vocab_size")
    decoder_modules = (tree_modules(spec.modules.decoder_layer) + HELPERS_PER_TREE
                       if spec.modules.decoder_layer else DECODER_LAYER_MODULES)
    mtp_modules = (tree_modules(spec.modules.mtp_layer) + decoder_modules + HELPERS_PER_TREE
                   if spec.modules.mtp_layer else MTP_LAYER_OWN_MODULES + decoder_modules)
    shared = [TensorEstimate("embedding.word_embeddings.weight", (dim(vocab), dim(hidden))),
              TensorEstimate("output_layer.weight", (dim(vocab), dim(hidden)))]
    if model.position_embedding == "learned_absolute":
        shared.append(TensorEstimate(
            "embedding.position_embeddings.weight",
            (dim((model.max_position_embeddings, _derived_key(
                model.max_position_embeddings, "model.max_position_embeddings",
                model.seq_length, "model.seq_length"))), dim(hidden))))
    return [
        Part("model", 1, "model", MODEL_FIXED_MODULES, tuple(shared)),
        Part("decoder layer", model.num_layers, "model.num_layers", decoder_modules,
             _layer_tensors(spec, "decoder.layers.N.")),
        Part("MTP layer", spec.mtp.num_layers, "mtp.num_layers", mtp_modules, (
            TensorEstimate("mtp.layers.N.eh_proj.weight",
                           (dim(hidden), dim((2 * model.hidden_size, "model.hidden_size")))),
            *_layer_tensors(spec, "mtp.layers.N.transformer_layer."))),
    ]


def estimated_modules(parts: list[Part]) -> int:
    return sum(part.count * part.modules for part in parts)


def check_size_limits(spec: RunSpec) -> None:
    """`SizeLimitError` naming the key to change when the model would break a limit."""
    parts = model_parts(spec)
    for part in parts:
        for tensor in part.tensors:
            if tensor.numel >= MAX_TENSOR_ELEMENTS:
                shape = " x ".join(f"{d.size:,}" for d in tensor.dims)
                raise SizeLimitError(tensor.key, (
                    f"the {part.name} tensor {tensor.name} would be {shape} = "
                    f"{float(tensor.numel):.3g} elements; a tensor must hold fewer than 2^62"))
    total = estimated_modules(parts)
    if total > MAX_MODULES:
        biggest = max(parts, key=lambda p: p.count * p.modules)
        raise SizeLimitError(biggest.count_key, (
            f"the model would have about {total:,} modules ({biggest.count:,} x {biggest.name} "
            f"of {biggest.modules} modules); the limit is {MAX_MODULES:,}"))
