"""The default decoder layer spec for a model config (Megatron's `get_gpt_layer_local_spec`).

GQA or multi-latent attention (`multi_latent_attention`), with QK / latent norms
(`qk_layernorm`); a dense MLP, or for MoE models (`num_moe_experts`) the slot that builds an MoE
layer or a dense MLP per layer (`moe_layer_freq`). Dense GQA models keep the plain tree.
"""

from __future__ import annotations

from mtp_cli.config.schema import ModelConfig
from mtp_cli.models.attention import self_attention_spec
from mtp_cli.models.mla import mla_self_attention_spec
from mtp_cli.models.moe.layer import moe_mlp_spec
from mtp_cli.models.transformer_layer import transformer_layer_spec
from mtp_cli.nn.module_spec import ModuleSpec


def decoder_layer_spec(config: ModelConfig | None = None) -> ModuleSpec:
    """The decoder layer tree `config` needs (every decoder layer, and the MTP layers)."""
    spec = transformer_layer_spec()
    if config is None:
        return spec
    if config.multi_latent_attention:
        spec.submodules["self_attention"] = mla_self_attention_spec(config.qk_layernorm)
    elif config.qk_layernorm:
        spec.submodules["self_attention"] = self_attention_spec(qk_layernorm=True)
    if config.num_moe_experts is not None:
        spec.submodules["mlp"] = moe_mlp_spec(config)
    return spec
