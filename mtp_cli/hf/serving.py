"""`mtp export --target`: which tensors go where, for the engine that will load the export.

- DeepSeek-V3, GLM-4.5, any target: depth k at `model.layers.{N+k}`, the released layout that
  transformers, vLLM and SGLang all load.
- dense, `transformers`: the same layout (transformers' `MtpModel` reads it).
- dense, `vllm`: MiMo's layout, every depth at `model.mtp_layers.{k}`; the default for a dense
  model Qwen2's block can compute (it loads in all three; `mtp import` reads it back).
- dense, `sglang`: MiMo's layout with depth 1 only; every depth in `mtp/model.safetensors`.

vLLM's and SGLang's Llama / Qwen2 loaders are strict: a tensor their model does not have
(`model.layers.{N+k}.eh_proj`) stops the load. The one dense MTP layout both serve speculatively
is Xiaomi MiMo's (`MiMoForCausalLM`: a Qwen2 model plus `model.mtp_layers.{k}` with
`token_layernorm`, `hidden_layernorm`, `input_proj`, `final_layernorm` and a Qwen2 block). Its
depth computes `final_layernorm(block(input_proj(cat[hidden_layernorm(h), token_layernorm(e)])))`
with `h` the main model's state *before* its final norm (Megatron's depth reads the state after
it) and the embedding zeroed at position 0: a model trained here drafts differently from how it
trained (`benchmarks/serve_check.py` measures by how much). A Qwen2 block always has q/k/v
biases (zeros for a Llama-shaped model) and no other biases, and its head dim is
hidden / heads: anything else is refused for these targets.

`mtp/model.safetensors` (written with `--target sglang`) holds every depth as
`--target transformers` names them (`model.layers.{N+k}.*`, without the embedding/head copies);
no engine reads it: SGLang 0.5.23's MiMo loader folds every `model.mtp_layers.{k}` into its one
MTP layer (the last read would win), so only depth 1 is in the model files.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from mtp_cli.config.schema import RunSpec
from mtp_cli.errors import Problem, UserError
from mtp_cli.hf.export_config import HFTarget
from mtp_cli.hf.mapping import (
    ARCHITECTURES,
    MTP_LAYER,
    FileTensor,
    LayoutContext,
    file_tensors,
    rule,
)
from mtp_cli.plan.run_plan import mtp_depths

TARGETS = ("transformers", "vllm", "sglang")
BESIDE = "mtp"  # OUT/mtp/model.safetensors: every depth, for a target that serves fewer
MIMO_DEPTH = (  # Megatron `mtp.layers.{k}.` <-> MiMo `model.mtp_layers.{k}.`
    rule("enorm.weight", "token_layernorm.weight"),
    rule("hnorm.weight", "hidden_layernorm.weight"),
    rule("eh_proj.weight", "input_proj.weight", layout="swap_halves"),
    rule("final_layernorm.weight", "final_layernorm.weight"),
)
QKV_WEIGHT = "self_attention.linear_qkv.weight"
QKV_BIAS = "self_attention.linear_qkv.bias"
MIMO_NOTE = ("MiMo's MTP layer (vLLM, SGLang) reads the main model's state before its final norm "
             "and zeroes the embedding at position 0; Megatron's (the trained depths) reads it "
             "after the norm: drafts differ from training")
MOE_DEPTHS = ("depths used for drafting: transformers generate(use_mtp=True) only depth 1, and "
              "only at model.layers.61 (DeepSeek-V3) / .46 or .92 (GLM-4.5); vLLM 0.32 drafts "
              "every step with depth 1's layer; SGLang 0.5.23 one NextN layer, loaded only when "
              "num_nextn_predict_layers is 1")
DENSE_DEPTHS = ("depths used for drafting: transformers' generate(use_mtp=True) loads them from "
                "model.layers.{N+k} at DeepSeek-V3's / GLM-4.5's layer counts only; vLLM's and "
                "SGLang's Llama/Qwen2 loaders refuse them (--target vllm or sglang writes "
                "MiMo's layout, which they serve)")
VLLM_DEPTHS = "depths used for drafting: vLLM 0.32 drafts every step with depth 1's layer"
SGLANG_DEPTHS = (f"depths used for drafting: SGLang 0.5.23 one MTP layer (depth 1, the only one "
                 f"in the model files; every depth is in {BESIDE}/model.safetensors)")


@dataclass
class ServingPlan:
    """config.json, the model files' tensors, the tensors of `mtp/model.safetensors` (none:
    no such file) and the notes export prints."""

    config: dict[str, Any]
    items: list[FileTensor]
    beside: list[FileTensor] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def check_target(target: str | None) -> str | None:
    """`--target` as given (None: `default_target` chooses once the model is known)."""
    if target is not None and target not in TARGETS:
        raise UserError(problems=[Problem(f"{target!r} is not one of {', '.join(TARGETS)}",
                                          key="--target")])
    return target


def default_target(spec: RunSpec, hf: HFTarget) -> tuple[str, list[str]]:
    """The layout an export without `--target` gets, and what to say about it: the one that
    loads in transformers, vLLM and SGLang. DeepSeek-V3 / GLM-4.5: their own (the same for
    every target); a dense model Qwen2 can compute: MiMo's (`vllm`: transformers loads it as
    Qwen2, vLLM and SGLang as MiMo; `mtp import` reads it back); any other dense model:
    `transformers`, whose MTP tensors vLLM's and SGLang's strict loaders refuse."""
    if hf.model_type in ("deepseek_v3", "glm4_moe") or not mtp_depths(spec):
        return "transformers", []
    reason = _qwen2_mismatch(spec.model)
    if reason is None:
        return "vllm", ["layout: MiMo's (--target vllm; transformers loads it as Qwen2, vLLM and "
                        "SGLang as MiMoForCausalLM; SGLang drafts with one depth: --target sglang "
                        "for D > 1; --target transformers for DeepSeek-V3's layout)"]
    return "transformers", [f"layout: transformers' (DeepSeek-V3's, MTP depths at "
                            f"model.layers.{{N+k}}), which vLLM's and SGLang's loaders refuse: "
                            f"MiMo's layout needs a Qwen2-shaped model ({reason[0]})"]


def serving_plan(spec: RunSpec, hf: HFTarget, ctx: LayoutContext, names: list[str],
                 target: str | None) -> ServingPlan:
    """What `mtp export --target TARGET` writes (see the module doc); None: the default."""
    check_target(target)
    notes: list[str] = []
    if target is None:
        target, notes = default_target(spec, hf)
    plan = _serving_plan(spec, hf, ctx, names, target)
    plan.notes[:0] = notes
    return plan


def _serving_plan(spec: RunSpec, hf: HFTarget, ctx: LayoutContext, names: list[str],
                  target: str) -> ServingPlan:
    tied = spec.model.share_embeddings_and_output_weights
    repeated = spec.mtp.use_repeated_layer
    arch = ARCHITECTURES[hf.model_type]
    every = file_tensors(arch, ctx, names, tied=tied, repeated_mtp=repeated)
    if hf.model_type in ("deepseek_v3", "glm4_moe"):
        return ServingPlan(hf.config, every, notes=[MOE_DEPTHS] if ctx.mtp_layers else [])
    if target == "transformers":
        return ServingPlan(hf.config, every, notes=[DENSE_DEPTHS] if ctx.mtp_layers else [])
    _refuse_non_qwen2(spec, target)
    inline = ctx.mtp_layers if target == "vllm" else min(ctx.mtp_layers, 1)
    main_names = [n for n in names if not n.startswith("mtp.")]
    items = file_tensors(ARCHITECTURES["qwen2"], replace(ctx, mtp_layers=0), main_names,
                         tied=tied)
    if f"decoder.layers.0.{QKV_BIAS}" not in names:
        items += [FileTensor(f"decoder.layers.{i}.{QKV_WEIGHT}",
                             _qkv_biases(f"model.layers.{i}."), "zero_qkv_bias")
                  for i in range(ctx.num_layers)]
    items += mimo_depth_items(names, inline, repeated=repeated)
    if inline and tied:  # MiMo's MTP model has its own lm_head (vLLM then shares the main one)
        items.append(FileTensor("embedding.word_embeddings.weight", ("lm_head.weight",),
                                copy=True))
    beside = [] if inline == ctx.mtp_layers else [
        t for t in every if t.megatron.startswith("mtp.") and not t.copy]
    notes = [MIMO_NOTE, VLLM_DEPTHS if target == "vllm" else SGLANG_DEPTHS] if inline else []
    return ServingPlan(_mimo_config(spec, hf, inline), items, beside, notes)


def _qkv_biases(prefix: str) -> tuple[str, ...]:
    return tuple(f"{prefix}self_attn.{p}_proj.bias" for p in "qkv")


def is_mimo(config: dict[str, Any]) -> bool:
    """Whether a model directory is in MiMo's layout (its depths at `model.mtp_layers.{k}`)."""
    return config.get("architectures") == ["MiMoForCausalLM"]


def mimo_depth_items(names: list[str], depths: int, *, repeated: bool = False
                     ) -> list[FileTensor]:
    """Depths 0..`depths`-1 of the model whose Megatron tensors are `names`, in MiMo's layout
    (what `--target vllm` writes and `mtp import` reads back)."""
    items: list[FileTensor] = []
    for k in range(depths):
        items += _mimo_depth(names, k, 0 if repeated else k)
    return items


def _mimo_depth(names: list[str], k: int, source: int) -> list[FileTensor]:
    """Depth k at `model.mtp_layers.{k}`: its own tensors, then its Qwen2 block (zero q/k/v
    biases where the model has none)."""
    meg, hf = f"mtp.layers.{source}.", f"model.mtp_layers.{k}."
    items = [FileTensor(meg + r.megatron, tuple(hf + h for h in r.hf), r.layout)
             for r in MIMO_DEPTH]
    block = meg + MTP_LAYER[0]
    for r in ARCHITECTURES["qwen2"].layer:
        if block + r.megatron in names:
            items.append(FileTensor(block + r.megatron, tuple(hf + h for h in r.hf), r.layout))
    if block + QKV_BIAS not in names:
        items.append(FileTensor(block + QKV_WEIGHT, _qkv_biases(hf), "zero_qkv_bias"))
    return items


def _qwen2_mismatch(model: Any) -> tuple[str, str] | None:
    """(why, key) when Qwen2's block cannot compute this model's layers, else None."""
    if model.add_bias_linear:
        return ("Qwen2 has biases on q/k/v only, this model on every linear layer",
                "model.add_bias_linear")
    if (model.kv_channels or 0) * model.num_attention_heads != model.hidden_size:
        return (f"Qwen2's head dim is hidden_size / heads = "
                f"{model.hidden_size // model.num_attention_heads}, this model's "
                f"{model.kv_channels}", "model.kv_channels")
    return None


def _refuse_non_qwen2(spec: RunSpec, target: str) -> None:
    mismatch = _qwen2_mismatch(spec.model)
    if mismatch is not None:
        raise UserError(problems=[Problem(
            f"--target {target} writes MiMo's layout (a Qwen2 model): {mismatch[0]}; "
            "--target transformers exports this model", key=mismatch[1])])


def _mimo_config(spec: RunSpec, hf: HFTarget, depths: int) -> dict[str, Any]:
    """Qwen2's config.json (transformers loads the main model as Qwen2ForCausalLM) naming
    `MiMoForCausalLM`, which vLLM and SGLang pick by `architectures`."""
    model = spec.model
    config = {k: v for k, v in hf.config.items() if k not in ("attention_bias", "mlp_bias")}
    config.update(architectures=["MiMoForCausalLM" if depths else "Qwen2ForCausalLM"],
                  model_type="qwen2", use_sliding_window=False,
                  head_dim=model.hidden_size // model.num_attention_heads,
                  num_nextn_predict_layers=depths)
    return config
