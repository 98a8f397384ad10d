"""Megatron-Core <-> Hugging Face transformers: tensor names and layouts, one table per model.

Each architecture is a table of `Rule(megatron, hf, layout)` rows in three scopes: the whole
model, one decoder layer (Megatron `decoder.layers.{i}.`, HF `model.layers.{i}.`) and one MTP
depth (Megatron `mtp.layers.{k}.`, HF `mtp.layers.{k}.`: the state dict of transformers'
`MtpModel` under an `mtp.` prefix; its layer holds the decoder-layer rules under
`transformer_layer.` / `mtp_block.`). Hugging Face names are those of the transformers model's
in-memory `state_dict()` (transformers converts its hub checkpoints, e.g. per-expert
`experts.{e}.gate_proj`, into these on load).

Layouts (how a Megatron tensor is made of its HF tensors):
- `copy`: the same tensor;
- `rows`: HF tensors stacked along rows (SwiGLU `linear_fc1 = [gate_proj; up_proj]`);
- `qkv`: GQA `linear_qkv`, rows grouped per query group `[q heads of g; k_g; v_g]`, from
  `q_proj`, `k_proj`, `v_proj` (weights and biases);
- `expert`: row `e` of HF's stacked `[E, ...]` expert tensor is Megatron's expert `{e}`;
- `swap_halves`: the two column halves exchanged (Megatron's `eh_proj` takes
  `[embedding, hidden]`, MiMo's `input_proj` `[hidden, embedding]`; its own inverse);
- `zero_qkv_bias`: export only, zero q/k/v biases shaped after `linear_qkv.weight` (a Qwen2
  block always has them; zeros compute a Llama block's function);
- `rope_q` / `rope_kv`: MLA tensors whose rotary rows (the last `qk_pos_emb_head_dim` rows of
  each query head / of the kv down projection) are permuted when the HF config has
  `rope_interleave: false` (Megatron's MLA always rotates adjacent pairs); copied otherwise.

Megatron's routed experts are stored one tensor per expert by global index, HF's stacked: the
`expert` layout slices and stacks. Shared experts and dense MLPs have no stacking.
Not mapped: HF's `MtpModel.embed_tokens` / `shared_head` (the main model's, shared).

Checkpoint files (`mtp export` / `mtp import`) name a few tensors differently from the in-memory
state dict: `FILE_*` below, expanded tensor by tensor by `file_tensors` (experts one per expert,
MTP depth k at `model.layers.{N+k}` with its copies of the embedding and head).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from mtp_cli.errors import UserError


@dataclass(frozen=True)
class Rule:
    """One Megatron tensor and the HF tensor(s) it is made of. `{e}`: global expert index."""

    megatron: str
    hf: tuple[str, ...]
    layout: str = "copy"


def rule(megatron: str, *hf: str, layout: str = "copy") -> Rule:
    return Rule(megatron, tuple(hf), layout)


@dataclass(frozen=True)
class Architecture:
    name: str  # the transformers model_type
    model: tuple[Rule, ...]
    layer: tuple[Rule, ...]
    mtp: tuple[Rule, ...]


@dataclass(frozen=True)
class LayoutContext:
    """The sizes layouts need."""

    num_layers: int
    mtp_layers: int = 0
    num_experts: int = 0
    heads: int = 1
    query_groups: int = 1
    head_dim: int = 1
    qk_head_dim: int = 0  # MLA
    rope_dim: int = 0  # MLA
    rope_interleave: bool = True  # MLA: HF stores rotary rows as adjacent pairs


MODEL_RULES = (
    rule("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
    rule("decoder.final_layernorm.weight", "model.norm.weight"),
    rule("output_layer.weight", "lm_head.weight"),
)
NORMS = (
    rule("input_layernorm.weight", "input_layernorm.weight"),
    rule("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"),
)
MLP_AND_MOE = (
    # dense layers
    rule("mlp.linear_fc1.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", layout="rows"),
    rule("mlp.linear_fc2.weight", "mlp.down_proj.weight"),
    # MoE layers
    rule("mlp.router.weight", "mlp.gate.weight"),
    rule("mlp.router.expert_bias", "mlp.gate.e_score_correction_bias"),
    rule("mlp.experts.local_experts.{e}.linear_fc1.weight", "mlp.experts.gate_up_proj",
         layout="expert"),
    rule("mlp.experts.local_experts.{e}.linear_fc2.weight", "mlp.experts.down_proj",
         layout="expert"),
    rule("mlp.shared_experts.linear_fc1.weight", "mlp.shared_experts.gate_proj.weight",
         "mlp.shared_experts.up_proj.weight", layout="rows"),
    rule("mlp.shared_experts.linear_fc2.weight", "mlp.shared_experts.down_proj.weight"),
)
MLA_ATTENTION = (
    rule("self_attention.linear_q_proj.weight", "self_attn.q_proj.weight", layout="rope_q"),
    rule("self_attention.linear_q_down_proj.weight", "self_attn.q_a_proj.weight"),
    rule("self_attention.q_layernorm.weight", "self_attn.q_a_layernorm.weight"),
    rule("self_attention.linear_q_up_proj.weight", "self_attn.q_b_proj.weight", layout="rope_q"),
    rule("self_attention.linear_kv_down_proj.weight", "self_attn.kv_a_proj_with_mqa.weight",
         layout="rope_kv"),
    rule("self_attention.kv_layernorm.weight", "self_attn.kv_a_layernorm.weight"),
    rule("self_attention.linear_kv_up_proj.weight", "self_attn.kv_b_proj.weight"),
    rule("self_attention.linear_proj.weight", "self_attn.o_proj.weight"),
)
GQA_ATTENTION = (
    rule("self_attention.linear_qkv.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
         "self_attn.v_proj.weight", layout="qkv"),
    rule("self_attention.linear_qkv.bias", "self_attn.q_proj.bias", "self_attn.k_proj.bias",
         "self_attn.v_proj.bias", layout="qkv"),
    rule("self_attention.q_layernorm.weight", "self_attn.q_norm.weight"),
    rule("self_attention.k_layernorm.weight", "self_attn.k_norm.weight"),
    rule("self_attention.linear_proj.weight", "self_attn.o_proj.weight"),
)
MTP_DEPTH = (
    rule("enorm.weight", "enorm.weight"),
    rule("hnorm.weight", "hnorm.weight"),
    rule("eh_proj.weight", "eh_proj.weight"),
    rule("final_layernorm.weight", "post_norm.weight"),
)

# Dense models: Llama (biases on every linear with `attention_bias` / `mlp_bias`, Megatron's
# `add_bias_linear`) and Qwen2 (q/k/v biases only, Megatron's `add_qkv_bias`).
LLAMA_ATTENTION = (
    rule("self_attention.linear_qkv.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
         "self_attn.v_proj.weight", layout="qkv"),
    rule("self_attention.linear_qkv.bias", "self_attn.q_proj.bias", "self_attn.k_proj.bias",
         "self_attn.v_proj.bias", layout="qkv"),
    rule("self_attention.linear_proj.weight", "self_attn.o_proj.weight"),
    rule("self_attention.linear_proj.bias", "self_attn.o_proj.bias"),
)
QWEN2_ATTENTION = LLAMA_ATTENTION[:3]
DENSE_MLP = (
    rule("mlp.linear_fc1.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", layout="rows"),
    rule("mlp.linear_fc2.weight", "mlp.down_proj.weight"),
)
DENSE_MLP_BIASES = (
    rule("mlp.linear_fc1.bias", "mlp.gate_proj.bias", "mlp.up_proj.bias", layout="rows"),
    rule("mlp.linear_fc2.bias", "mlp.down_proj.bias"),
)

DEEPSEEK_V3 = Architecture("deepseek_v3", MODEL_RULES, NORMS + MLA_ATTENTION + MLP_AND_MOE,
                           MTP_DEPTH)
GLM4_MOE = Architecture("glm4_moe", MODEL_RULES, NORMS + GQA_ATTENTION + MLP_AND_MOE, MTP_DEPTH)
LLAMA = Architecture("llama", MODEL_RULES, NORMS + LLAMA_ATTENTION + DENSE_MLP + DENSE_MLP_BIASES,
                     MTP_DEPTH)
QWEN2 = Architecture("qwen2", MODEL_RULES, NORMS + QWEN2_ATTENTION + DENSE_MLP, MTP_DEPTH)
ARCHITECTURES = {arch.name: arch for arch in (DEEPSEEK_V3, GLM4_MOE, LLAMA, QWEN2)}

MTP_LAYER = ("transformer_layer.", "mtp_block.")  # the depth's decoder layer, both sides

# --- Hugging Face checkpoint files ------------------------------------------------------------
# What `save_pretrained` writes, DeepSeek's released checkpoints hold and serving engines read,
# where it differs from the in-memory names above (transformers converts these on load):
# routed experts one tensor set per expert, and MTP depth k of a model with N decoder layers as
# `model.layers.{N+k}.` - its decoder layer's tensors directly under that prefix - with copies of
# the main embedding and head.
FILE_EXPERTS = (
    rule("mlp.experts.local_experts.{e}.linear_fc1.weight", "mlp.experts.{e}.gate_proj.weight",
         "mlp.experts.{e}.up_proj.weight", layout="rows"),
    rule("mlp.experts.local_experts.{e}.linear_fc2.weight", "mlp.experts.{e}.down_proj.weight"),
)
FILE_MTP_DEPTH = (  # Megatron `mtp.layers.{k}.` <-> HF `model.layers.{N+k}.`
    rule("enorm.weight", "enorm.weight"),
    rule("hnorm.weight", "hnorm.weight"),
    rule("eh_proj.weight", "eh_proj.weight"),
    rule("final_layernorm.weight", "shared_head.norm.weight"),
)
FILE_MTP_COPIES = (  # main-model tensors every depth repeats (written on export, checked on import)
    rule("embedding.word_embeddings.weight", "embed_tokens.weight"),
    rule("output_layer.weight", "shared_head.head.weight"),
)


# --- layouts ---------------------------------------------------------------------------------
def _rope_order(rows: int, rope_dim: int) -> torch.Tensor:
    """Row order taking HF's half-split rotary rows (the last `rope_dim` of `rows`) to pairs."""
    order = torch.arange(rows)
    rope = torch.arange(rows - rope_dim, rows)
    half = rope_dim // 2
    order[rows - rope_dim:] = torch.stack([rope[:half], rope[half:]], dim=1).reshape(-1)
    return order


def _permute_rope(tensor: torch.Tensor, ctx: LayoutContext, per_head: bool, inverse: bool
                  ) -> torch.Tensor:
    if ctx.rope_interleave:
        return tensor
    block = ctx.qk_head_dim + ctx.rope_dim if per_head else tensor.shape[0]
    order = _rope_order(block, ctx.rope_dim)
    if inverse:
        order = torch.argsort(order)
    blocks = tensor.reshape(-1, block, *tensor.shape[1:])
    return blocks[:, order].reshape(tensor.shape)


def _qkv_to_megatron(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: LayoutContext
                     ) -> torch.Tensor:
    rest = q.shape[1:]
    parts = [t.reshape(ctx.query_groups, -1, *rest) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def _qkv_to_hf(qkv: torch.Tensor, ctx: LayoutContext) -> list[torch.Tensor]:
    groups, d = ctx.query_groups, ctx.head_dim
    per_group = ctx.heads // groups
    rest = qkv.shape[1:]
    grouped = qkv.reshape(groups, (per_group + 2) * d, *rest)
    q, k, v = grouped.split([per_group * d, d, d], dim=1)
    return [t.reshape(-1, *rest) for t in (q, k, v)]


def to_megatron_tensor(layout: str, parts: list[torch.Tensor], ctx: LayoutContext
                       ) -> torch.Tensor:
    if layout == "copy":
        return parts[0]
    if layout == "rows":
        return torch.cat(parts, dim=0)
    if layout == "qkv":
        return _qkv_to_megatron(*parts, ctx)
    if layout in ("rope_q", "rope_kv"):
        return _permute_rope(parts[0], ctx, per_head=layout == "rope_q", inverse=False)
    if layout == "swap_halves":
        return _swap_halves(parts[0])
    raise ValueError(f"unknown layout {layout!r}")


def to_hf_tensors(layout: str, tensor: torch.Tensor, ctx: LayoutContext, count: int
                  ) -> list[torch.Tensor]:
    if layout == "copy":
        return [tensor]
    if layout == "rows":
        return list(tensor.chunk(count, dim=0))
    if layout == "qkv":
        return _qkv_to_hf(tensor, ctx)
    if layout in ("rope_q", "rope_kv"):
        return [_permute_rope(tensor, ctx, per_head=layout == "rope_q", inverse=True)]
    if layout == "swap_halves":
        return [_swap_halves(tensor)]
    if layout == "zero_qkv_bias":
        return [tensor.new_zeros(t.shape[:1]) for t in _qkv_to_hf(tensor, ctx)]
    raise ValueError(f"unknown layout {layout!r}")


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=1)
    return torch.cat([second, first], dim=1)


# --- whole state dicts -----------------------------------------------------------------------
def _scopes(arch: Architecture, ctx: LayoutContext) -> list[tuple[str, str, tuple[Rule, ...]]]:
    """(Megatron prefix, HF prefix, rules) for every scope of the model."""
    scopes = [("", "", arch.model)]
    for i in range(ctx.num_layers):
        scopes.append((f"decoder.layers.{i}.", f"model.layers.{i}.", arch.layer))
    for k in range(ctx.mtp_layers):
        meg, hf = f"mtp.layers.{k}.", f"mtp.layers.{k}."
        scopes.append((meg, hf, arch.mtp))
        scopes.append((meg + MTP_LAYER[0], hf + MTP_LAYER[1], arch.layer))
    return scopes


def _leftovers(names: set[str], side: str) -> None:
    if names:
        shown = ", ".join(sorted(names)[:6]) + (" ..." if len(names) > 6 else "")
        raise UserError(f"{len(names)} {side} tensors have no mapping: {shown}")


def hf_to_megatron(arch: Architecture, hf: Mapping[str, torch.Tensor], ctx: LayoutContext
                   ) -> dict[str, torch.Tensor]:
    """A transformers state dict (MTP depths under `mtp.`) -> Megatron names and layouts."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for meg_prefix, hf_prefix, rules in _scopes(arch, ctx):
        for item in rules:
            sources = [hf_prefix + name for name in item.hf]
            if not all(name in hf for name in sources):
                continue
            used.update(sources)
            if item.layout == "expert":
                stacked = hf[sources[0]]
                for e in range(stacked.shape[0]):
                    out[meg_prefix + item.megatron.format(e=e)] = stacked[e]
                continue
            parts = [hf[name] for name in sources]
            out[meg_prefix + item.megatron] = to_megatron_tensor(item.layout, parts, ctx)
    _leftovers({n for n in hf if n not in used and not _shared_by_mtp(n)}, "Hugging Face")
    return out


def megatron_to_hf(arch: Architecture, megatron: Mapping[str, torch.Tensor], ctx: LayoutContext
                   ) -> dict[str, torch.Tensor]:
    """Megatron names (MTP layer as `transformer_layer`) -> a transformers state dict."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for meg_prefix, hf_prefix, rules in _scopes(arch, ctx):
        for item in rules:
            if item.layout == "expert":
                names = [meg_prefix + item.megatron.format(e=e) for e in range(ctx.num_experts)]
                if names and all(n in megatron for n in names):
                    used.update(names)
                    out[hf_prefix + item.hf[0]] = torch.stack([megatron[n] for n in names])
                continue
            name = meg_prefix + item.megatron
            if name not in megatron:
                continue
            used.add(name)
            tensors = to_hf_tensors(item.layout, megatron[name], ctx, len(item.hf))
            out.update({hf_prefix + h: t for h, t in zip(item.hf, tensors, strict=True)})
    _leftovers(set(megatron) - used, "Megatron")
    return out


def _shared_by_mtp(name: str) -> bool:
    """HF MtpModel's references to the main model's embedding and head (not its own)."""
    return name.startswith("mtp.") and name.endswith(("embed_tokens.weight",
                                                      "shared_head.weight"))


# --- checkpoint files, one tensor at a time --------------------------------------------------
@dataclass(frozen=True)
class FileTensor:
    """One Megatron tensor and the Hugging Face checkpoint tensors it is written as.

    `copy`: the HF tensors repeat a main-model tensor (an MTP depth's `embed_tokens` and
    `shared_head.head`, or a tied `lm_head`): written on export, compared with it on import.
    """

    megatron: str
    hf: tuple[str, ...]
    layout: str = "copy"
    copy: bool = False


def _file_layer_rules(arch: Architecture) -> tuple[Rule, ...]:
    return tuple(r for r in arch.layer if r.layout != "expert") + FILE_EXPERTS


def _expand(rules: tuple[Rule, ...], meg_prefix: str, hf_prefix: str, num_experts: int
            ) -> list[FileTensor]:
    out = []
    for item in rules:
        for e in range(num_experts) if "{e}" in item.megatron else [None]:
            meg = meg_prefix + (item.megatron.format(e=e) if e is not None else item.megatron)
            hf = tuple(hf_prefix + (h.format(e=e) if e is not None else h) for h in item.hf)
            out.append(FileTensor(meg, hf, item.layout))
    return out


def file_tensors(arch: Architecture, ctx: LayoutContext, megatron_names: Iterable[str], *,
                 tied: bool, repeated_mtp: bool = False) -> list[FileTensor]:
    """Every tensor of a Hugging Face checkpoint of the model whose Megatron tensors are
    `megatron_names`, in file order: the embedding, decoder layers, MTP depths (at
    `model.layers.{N+k}`, each with its copies), final norm and head. `tied`: no `lm_head`
    (the embedding serves); `repeated_mtp`: every depth is Megatron's `mtp.layers.0`.
    A Megatron tensor no row maps is an error (`UserError`)."""
    names = set(megatron_names)
    head = "embedding.word_embeddings.weight" if tied else "output_layer.weight"
    layer_rules, experts = _file_layer_rules(arch), ctx.num_experts
    planned = [FileTensor("embedding.word_embeddings.weight", ("model.embed_tokens.weight",))]
    for i in range(ctx.num_layers):
        planned += _expand(layer_rules, f"decoder.layers.{i}.", f"model.layers.{i}.", experts)
    for k in range(ctx.mtp_layers):
        meg, hf = f"mtp.layers.{0 if repeated_mtp else k}.", f"model.layers.{ctx.num_layers + k}."
        planned += _expand(FILE_MTP_DEPTH, meg, hf, experts)
        planned += _expand(layer_rules, meg + MTP_LAYER[0], hf, experts)
        planned += [FileTensor(head if item.megatron == "output_layer.weight" else item.megatron,
                               (hf + item.hf[0],), copy=True) for item in FILE_MTP_COPIES]
    planned += [FileTensor("decoder.final_layernorm.weight", ("model.norm.weight",))]
    if not tied:
        planned += [FileTensor("output_layer.weight", ("lm_head.weight",))]
    chosen = [t for t in planned if t.megatron in names]
    _leftovers(names - {t.megatron for t in chosen}, "Megatron")
    return chosen
