"""A Hugging Face config (DeepSeek-V3, GLM-4.5, Llama, Qwen2) as a run spec's `model` and `mtp`
sections.

`spec_sections(hf_config)` reads a transformers config (object or `config.json` mapping) and
returns the Megatron-named keys that build the same model, plus the `LayoutContext` the weight
mapping (`mtp_cli.hf.mapping`) needs. Refused, because Megatron-Core's router cannot express
them: un-normalised sigmoid top-k weights (`norm_topk_prob: false`), and group-limited routing
whose groups are not ranked by their top two scores (`topk / topk_group != 2`, transformers'
fixed rule). HF's MLA latent norms use eps 1e-6 whatever `rms_norm_eps` says: refused unless
they agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mtp_cli.errors import UserError
from mtp_cli.hf.mapping import LayoutContext


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def _rope(config: Any) -> dict[str, Any]:
    params = _get(config, "rope_parameters") or _get(config, "rope_scaling") or {}
    params = dict(params)
    params.setdefault("rope_theta", _get(config, "rope_theta", 10000.0))
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    return params


def _moe_keys(config: Any, num_layers: int) -> dict[str, Any]:
    topk, groups = _get(config, "num_experts_per_tok"), _get(config, "n_group") or 1
    group_topk = _get(config, "topk_group") or 1
    if not _get(config, "norm_topk_prob", True) and topk > 1:
        raise UserError("norm_topk_prob: false has no Megatron-Core equivalent (sigmoid top-k "
                        "weights are always normalised)")
    first_dense = _get(config, "first_k_dense_replace", 0) or 0
    keys: dict[str, Any] = {
        "num_moe_experts": _get(config, "n_routed_experts"),
        "moe_router_topk": topk,
        "moe_ffn_hidden_size": _get(config, "moe_intermediate_size"),
        "moe_layer_freq": [0] * first_dense + [1] * (num_layers - first_dense),
        "moe_router_score_function": "sigmoid",
        "moe_router_enable_expert_bias": True,
        "moe_router_load_balancing_type": "none",
    }
    scaling = float(_get(config, "routed_scaling_factor", 1.0))
    if scaling != 1.0:
        keys["moe_router_topk_scaling_factor"] = scaling
    shared = _get(config, "n_shared_experts") or 0
    if shared:
        keys["moe_shared_expert_intermediate_size"] = shared * keys["moe_ffn_hidden_size"]
    if groups > 1:
        if topk // group_topk != 2:
            raise UserError(f"transformers ranks expert groups by their top 2 scores; "
                            f"Megatron-Core by the top topk / topk_group = {topk // group_topk}")
        keys.update(moe_router_num_groups=groups, moe_router_group_topk=group_topk)
    return keys


def _attention_keys(model_type: str, config: Any, rope: dict[str, Any]) -> dict[str, Any]:
    if model_type == "deepseek_v3":
        if _get(config, "attention_bias", False):
            raise UserError("MLA with attention biases has no Megatron-Core equivalent")
        if abs(_get(config, "rms_norm_eps") - 1e-6) > 1e-12:
            raise UserError("transformers' DeepSeek-V3 latent norms use eps 1e-6; rms_norm_eps "
                            f"is {_get(config, 'rms_norm_eps')}")
        keys = {"multi_latent_attention": True, "qk_layernorm": True,
                "q_lora_rank": _get(config, "q_lora_rank"),
                "kv_lora_rank": _get(config, "kv_lora_rank"),
                "qk_head_dim": _get(config, "qk_nope_head_dim"),
                "qk_pos_emb_head_dim": _get(config, "qk_rope_head_dim"),
                "v_head_dim": _get(config, "v_head_dim")}
        if rope.get("rope_type") == "yarn":
            keys.update(rope_type="yarn", rotary_scaling_factor=float(rope["factor"]),
                        original_max_position_embeddings=rope["original_max_position_embeddings"],
                        beta_fast=float(rope.get("beta_fast") or 32),
                        beta_slow=float(rope.get("beta_slow") or 1),
                        mscale=float(rope.get("mscale") or 1.0),
                        mscale_all_dim=float(rope.get("mscale_all_dim") or 0.0))
        return keys
    heads = _get(config, "num_attention_heads")
    return {"num_query_groups": _get(config, "num_key_value_heads") or heads,
            "kv_channels": _get(config, "head_dim") or _get(config, "hidden_size") // heads,
            "rotary_percent": float(rope.get("partial_rotary_factor",
                                             _get(config, "partial_rotary_factor", 1.0))),
            "add_qkv_bias": bool(_get(config, "attention_bias", False)),
            "qk_layernorm": bool(_get(config, "use_qk_norm", False))}


def _dense_keys(model_type: str, config: Any, rope: dict[str, Any]) -> dict[str, Any]:
    """Llama / Qwen2: GQA with full RoPE; biases on every linear (Llama's attention_bias and
    mlp_bias together, Megatron's add_bias_linear) or on q/k/v only (Qwen2, add_qkv_bias)."""
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"rope_type {rope['rope_type']!r}: mtp-cli's GQA RoPE is unscaled")
    if _get(config, "hidden_act", "silu") != "silu":
        raise UserError(f"hidden_act {_get(config, 'hidden_act')!r}: SwiGLU needs silu")
    if model_type == "qwen2" and _get(config, "use_sliding_window", False):
        raise UserError("use_sliding_window: true has no Megatron-Core equivalent here")
    biases = (bool(_get(config, "attention_bias", False)), bool(_get(config, "mlp_bias", False)))
    if model_type == "llama" and biases[0] != biases[1]:
        raise UserError(f"attention_bias {biases[0]} with mlp_bias {biases[1]}: Megatron-Core's "
                        "add_bias_linear puts biases on every linear layer or on none")
    heads = _get(config, "num_attention_heads")
    return {"num_query_groups": _get(config, "num_key_value_heads") or heads,
            "kv_channels": _get(config, "head_dim") or _get(config, "hidden_size") // heads,
            "add_bias_linear": model_type == "llama" and biases[0],
            "add_qkv_bias": model_type == "qwen2"}


def spec_sections(config: Any, *, seq_length: int | None = None
                  ) -> tuple[dict[str, Any], LayoutContext]:
    """`({model: ..., mtp: ...}, layout context)` for a DeepSeek-V3, GLM-4.5, Llama or Qwen2
    config."""
    model_type = _get(config, "model_type")
    if model_type not in ("deepseek_v3", "glm4_moe", "llama", "qwen2"):
        raise UserError(f"no mapping for model_type {model_type!r} (deepseek_v3, glm4_moe, "
                        "llama, qwen2)")
    num_layers = _get(config, "num_hidden_layers")
    rope = _rope(config)
    dense = model_type in ("llama", "qwen2")
    kinds = _dense_keys(model_type, config, rope) if dense else {
        **_attention_keys(model_type, config, rope), **_moe_keys(config, num_layers)}
    model = {
        "vocab_size": _get(config, "vocab_size"),
        "hidden_size": _get(config, "hidden_size"),
        "num_layers": num_layers,
        "num_attention_heads": _get(config, "num_attention_heads"),
        "ffn_hidden_size": _get(config, "intermediate_size"),
        "seq_length": seq_length or _get(config, "max_position_embeddings"),
        "max_position_embeddings": _get(config, "max_position_embeddings"),
        "normalization": "RMSNorm",
        "layernorm_epsilon": float(_get(config, "rms_norm_eps")),
        "activation": "swiglu",
        "position_embedding": "rope",
        "rotary_base": float(rope["rope_theta"]),
        "add_bias_linear": False,
        "share_embeddings_and_output_weights": bool(_get(config, "tie_word_embeddings", False)),
        "init_method_std": float(_get(config, "initializer_range", 0.02)),
        **kinds,
    }
    depths = _get(config, "num_nextn_predict_layers", _get(config, "num_mtp_layers", 0)) or 0
    context = LayoutContext(
        num_layers=num_layers, mtp_layers=depths, num_experts=model.get("num_moe_experts") or 0,
        heads=model["num_attention_heads"], query_groups=model.get("num_query_groups", 1),
        head_dim=model.get("kv_channels", 1), qk_head_dim=model.get("qk_head_dim", 0),
        rope_dim=model.get("qk_pos_emb_head_dim", 0),
        rope_interleave=bool(_get(config, "rope_interleave", True)),
    )
    return {"model": model, "mtp": {"num_layers": depths}}, context
