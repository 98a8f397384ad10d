"""A run spec's model as the transformers class that computes the same function, and its
`config.json`: the inverse of `mtp_cli.hf.configs`.

| mtp-cli model                                   | transformers class          |
|-------------------------------------------------|-----------------------------|
| GQA, no biases                                  | LlamaForCausalLM            |
| GQA, biases on every linear (add_bias_linear)   | LlamaForCausalLM (attention_bias, mlp_bias) |
| GQA, q/k/v biases only (add_qkv_bias)           | Qwen2ForCausalLM            |
| multi-latent attention + MoE                    | DeepseekV3ForCausalLM       |
| GQA + MoE                                       | Glm4MoeForCausalLM          |

All of them are RMSNorm + SwiGLU + RoPE decoders. Anything else (LayerNorm, GELU, learned
positions, a custom ModuleSpec tree, QK norms on a dense model, routing transformers does not
compute) is refused with the reason: an export that loads but computes another function is
worse than none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mtp_cli.config.schema import ModelConfig, RunSpec
from mtp_cli.errors import Problem, UserError
from mtp_cli.hf.mapping import LayoutContext
from mtp_cli.plan.run_plan import mtp_depths

CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
           "deepseek_v3": "DeepseekV3ForCausalLM", "glm4_moe": "Glm4MoeForCausalLM"}


@dataclass(frozen=True)
class HFTarget:
    """The transformers model an export writes."""

    model_type: str  # the key of mtp_cli.hf.mapping.ARCHITECTURES
    config: dict[str, Any]  # config.json

    @property
    def architecture(self) -> str:
        return CLASSES[self.model_type]


def refuse(reason: str, key: str | None = None) -> UserError:
    return UserError(problems=[Problem(f"no transformers class computes this model: {reason}",
                                       key=key)])


def _common_refusals(spec: RunSpec) -> None:
    model = spec.model
    if model.normalization != "RMSNorm":
        raise refuse(f"normalization {model.normalization} (the classes exported to use "
                     "RMSNorm)", "model.normalization")
    if model.activation != "swiglu":
        raise refuse(f"activation {model.activation} (they use SwiGLU)", "model.activation")
    if model.position_embedding != "rope":
        raise refuse(f"position_embedding {model.position_embedding} (they use RoPE)",
                     "model.position_embedding")
    if spec.modules.decoder_layer is not None or spec.modules.mtp_layer is not None:
        raise refuse("a custom ModuleSpec tree (modules:)", "modules")


def layout_context(spec: RunSpec) -> LayoutContext:
    """The sizes the weight layouts need, from the spec (Megatron rotates MLA pairs: exported
    with `rope_interleave: true`, nothing to permute)."""
    model = spec.model
    return LayoutContext(
        num_layers=model.num_layers, mtp_layers=mtp_depths(spec),
        num_experts=model.num_moe_experts or 0, heads=model.num_attention_heads,
        query_groups=model.num_query_groups or model.num_attention_heads,
        head_dim=model.kv_channels or 1, qk_head_dim=model.qk_head_dim,
        rope_dim=model.qk_pos_emb_head_dim, rope_interleave=True)


def _dense(model: ModelConfig) -> tuple[str, dict[str, Any]]:
    if model.qk_layernorm:
        raise refuse("qk_layernorm on a dense GQA model (Llama and Qwen2 have no QK norms)",
                     "model.qk_layernorm")
    if model.rotary_percent != 1:
        raise refuse(f"rotary_percent {model.rotary_percent} on a dense model (Llama and Qwen2 "
                     "rotate whole heads)", "model.rotary_percent")
    keys = {"num_key_value_heads": model.num_query_groups, "head_dim": model.kv_channels,
            "rope_parameters": {"rope_type": "default", "rope_theta": model.rotary_base}}
    if model.add_bias_linear:
        return "llama", {**keys, "attention_bias": True, "mlp_bias": True}
    if model.add_qkv_bias:
        return "qwen2", {**keys, "use_sliding_window": False}
    return "llama", {**keys, "attention_bias": False, "mlp_bias": False}


def _first_dense_layers(model: ModelConfig) -> int:
    """`first_k_dense_replace`: transformers' MoE models are k dense layers, then MoE ones."""
    freq = model.moe_layer_freq
    pattern = [int(i % freq == 0) for i in range(model.num_layers)] if isinstance(freq, int) \
        else list(freq)
    first = pattern.index(1) if 1 in pattern else len(pattern)
    if first == len(pattern) or any(bit == 0 for bit in pattern[first:]):
        raise refuse(f"moe_layer_freq {freq} (transformers' MoE classes have k dense layers "
                     "and MoE layers after them)", "model.moe_layer_freq")
    return first


def _moe(model: ModelConfig) -> dict[str, Any]:
    if model.add_bias_linear:
        raise refuse("add_bias_linear in a MoE model", "model.add_bias_linear")
    if model.moe_router_score_function != "sigmoid":
        raise refuse("softmax router scores (transformers' DeepSeek-V3 and GLM-4.5, and vLLM's "
                     "GLM-4-MoE, route on sigmoid scores)", "model.moe_router_score_function")
    if not model.moe_router_enable_expert_bias:
        raise refuse("no expert bias (their routers always add e_score_correction_bias, vLLM's "
                     "GLM-4-MoE too; set moe_router_enable_expert_bias: true)",
                     "model.moe_router_enable_expert_bias")
    shared, width = model.moe_shared_expert_intermediate_size, model.moe_ffn_hidden_size
    if not shared or shared % width:
        raise refuse("shared experts must be n x moe_ffn_hidden_size wide (their MoE layers "
                     "always have n_shared_experts >= 1)",
                     "model.moe_shared_expert_intermediate_size")
    topk, groups = model.moe_router_topk, model.moe_router_num_groups or 1
    group_topk = model.moe_router_group_topk or 1
    if groups > 1 and topk // group_topk != 2:
        raise refuse(f"groups ranked by their top {topk // group_topk} scores (transformers "
                     "ranks them by their top 2: topk / group_topk must be 2)",
                     "model.moe_router_group_topk")
    return {"n_routed_experts": model.num_moe_experts, "num_experts_per_tok": topk,
            "moe_intermediate_size": width, "n_shared_experts": shared // width,
            "n_group": groups, "topk_group": group_topk, "norm_topk_prob": topk > 1,
            "routed_scaling_factor": model.moe_router_topk_scaling_factor or 1.0,
            "first_k_dense_replace": _first_dense_layers(model), **_router_keys(model)}


def _router_keys(model: ModelConfig) -> dict[str, Any]:
    """The routing keys serving engines read and transformers ignores (the released
    DeepSeek-V3 config.json has them): vLLM and SGLang create `e_score_correction_bias` only for
    `topk_method: noaux_tc` and default `scoring_func` to softmax, so without them an export
    fails to load or silently computes another function (`_moe` admits only sigmoid scores
    with an expert bias: always noaux_tc). `moe_layer_freq` 1: every layer after
    the first `first_k_dense_replace` is MoE (SGLang reads it without a default)."""
    return {"topk_method": "noaux_tc", "scoring_func": model.moe_router_score_function,
            "moe_layer_freq": 1}


def _legacy_rope(rope: dict[str, Any]) -> dict[str, Any]:
    """`rope_theta` / `rope_scaling` beside `rope_parameters`: the keys released checkpoints
    carry, read by engines and tools that predate transformers 5 (transformers 5 reads
    `rope_scaling` first: the same dict, so both agree)."""
    scaling = None if rope["rope_type"] == "default" else {**rope, "type": rope["rope_type"]}
    return {"rope_theta": rope["rope_theta"], "rope_scaling": scaling}


def _mla(model: ModelConfig) -> dict[str, Any]:
    if not model.qk_layernorm:
        raise refuse("MLA without latent norms (DeepSeek-V3 always normalises its latents)",
                     "model.qk_layernorm")
    if abs(model.layernorm_epsilon - 1e-6) > 1e-12:
        raise refuse(f"layernorm_epsilon {model.layernorm_epsilon} with MLA (transformers' "
                     "DeepSeek-V3 latent norms use 1e-6)", "model.layernorm_epsilon")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": model.rotary_base}
    if model.rope_type == "yarn":
        rope = {"rope_type": "yarn", "rope_theta": model.rotary_base,
                "factor": model.rotary_scaling_factor,
                "original_max_position_embeddings": model.original_max_position_embeddings,
                "beta_fast": model.beta_fast, "beta_slow": model.beta_slow,
                "mscale": model.mscale, "mscale_all_dim": model.mscale_all_dim}
    return {"num_key_value_heads": model.num_attention_heads, "q_lora_rank": model.q_lora_rank,
            "kv_lora_rank": model.kv_lora_rank, "qk_nope_head_dim": model.qk_head_dim,
            "qk_rope_head_dim": model.qk_pos_emb_head_dim, "v_head_dim": model.v_head_dim,
            "rope_interleave": True, "attention_bias": False, "rope_parameters": rope}


def _glm(model: ModelConfig) -> dict[str, Any]:
    return {"num_key_value_heads": model.num_query_groups, "head_dim": model.kv_channels,
            "attention_bias": model.add_qkv_bias, "use_qk_norm": model.qk_layernorm,
            "partial_rotary_factor": model.rotary_percent,  # SGLang's default is 0.5
            "rope_parameters": {"rope_type": "default", "rope_theta": model.rotary_base,
                                "partial_rotary_factor": model.rotary_percent}}


def hf_target(spec: RunSpec, *, dtype: torch.dtype, eos_token_id: int | None = None,
              bos_token_id: int | None = None) -> HFTarget:
    """The transformers class and config.json for `spec`'s model; `UserError` with the reason
    when no class computes it."""
    _common_refusals(spec)
    model = spec.model
    if model.num_moe_experts is None and model.multi_latent_attention:
        raise refuse("multi-latent attention without routed experts (DeepseekV3ForCausalLM "
                     "builds its MTP layers as MoE layers)", "model.num_moe_experts")
    if model.num_moe_experts is None:
        model_type, keys = _dense(model)
    elif model.multi_latent_attention:
        model_type, keys = "deepseek_v3", {**_mla(model), **_moe(model)}
    else:
        model_type, keys = "glm4_moe", {**_glm(model), **_moe(model)}
    config = {
        "architectures": [CLASSES[model_type]], "model_type": model_type,
        "vocab_size": model.vocab_size, "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size, "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads, "hidden_act": "silu",
        "max_position_embeddings": model.max_position_embeddings,
        "initializer_range": model.init_method_std, "rms_norm_eps": model.layernorm_epsilon,
        "tie_word_embeddings": model.share_embeddings_and_output_weights,
        "attention_dropout": 0.0, "use_cache": True,
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
        **keys,
        "num_nextn_predict_layers": mtp_depths(spec),
        "dtype": str(dtype).removeprefix("torch."),
    }
    config.update(_legacy_rope(config["rope_parameters"]))
    return HFTarget(model_type, config)


def generation_config(target: HFTarget) -> dict[str, Any]:
    """generation_config.json: greedy decoding ending at the end-of-document token."""
    return {"bos_token_id": target.config["bos_token_id"],
            "eos_token_id": target.config["eos_token_id"], "do_sample": False}
