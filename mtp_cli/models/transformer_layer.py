"""The pre-norm transformer layer and the decoder stack that holds a stage's layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mtp_cli.config.schema import ModelConfig
from mtp_cli.models.attention import self_attention_spec
from mtp_cli.models.inference import InferenceContext
from mtp_cli.models.mlp import mlp_spec
from mtp_cli.nn.module_spec import ModuleSpec, build_module, register_module
from mtp_cli.nn.packed import PackedSeqParams


@dataclass
class TransformerLayerSubmodules:
    input_layernorm: Any = None
    self_attention: Any = None
    pre_mlp_layernorm: Any = None
    mlp: Any = None


@register_module(submodules=TransformerLayerSubmodules)
class TransformerLayer(nn.Module):
    """`x + attn(norm(x))`, then `x + mlp(norm(x))`. `layer_number` is global and 1-based."""

    def __init__(self, config: ModelConfig, submodules: TransformerLayerSubmodules,
                 layer_number: int = 1) -> None:
        super().__init__()
        self.layer_number = layer_number
        h = config.hidden_size
        self.input_layernorm = build_module(submodules.input_layernorm, config=config,
                                            hidden_size=h)
        self.self_attention = build_module(submodules.self_attention, config=config,
                                           layer_number=layer_number)
        self.pre_mlp_layernorm = build_module(submodules.pre_mlp_layernorm, config=config,
                                              hidden_size=h)
        # MoE layers need their number (Megatron: MoE modules get layer_number / is_mtp_layer)
        mlp_kwargs = {"layer_number": layer_number} if _takes_layer_number(submodules.mlp) else {}
        self.mlp = build_module(submodules.mlp, config=config, **mlp_kwargs)
        self.hidden_dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                rotary_pos_emb: torch.Tensor | None = None,
                packed_seq_params: PackedSeqParams | None = None,
                inference_context: InferenceContext | None = None) -> torch.Tensor:
        """`inference_context`: the KV cache of decoding, handed to the attention only when
        given (attention modules of other specs need not know the argument)."""
        extra = {} if inference_context is None else {"inference_context": inference_context}
        attention = self.self_attention(self.input_layernorm(hidden_states), attention_mask,
                                        rotary_pos_emb, packed_seq_params, **extra)
        hidden_states = hidden_states + self.hidden_dropout(attention)
        mlp = self.mlp(self.pre_mlp_layernorm(hidden_states))
        return hidden_states + self.hidden_dropout(mlp)


def _takes_layer_number(spec: Any) -> bool:
    factory = spec.module if isinstance(spec, ModuleSpec) else spec
    return bool(getattr(factory, "takes_layer_number", False))


def transformer_layer_spec() -> ModuleSpec:
    """The default decoder layer (Megatron's GPT local spec), with backend slots."""
    return ModuleSpec(
        module="TransformerLayer",
        submodules={
            "input_layernorm": ModuleSpec("backend.layer_norm"),
            "self_attention": self_attention_spec(),
            "pre_mlp_layernorm": ModuleSpec("backend.layer_norm"),
            "mlp": mlp_spec(),
        },
    )


class TransformerBlock(nn.Module):
    """A stage's decoder layers, keyed by their global 0-based index, and the final norm.

    Keys are global (`layers.12` on the stage that holds layer 13), so every stage's state dict
    uses the names of the single-process model and checkpoints reshard by name.
    """

    def __init__(self, config: ModelConfig, layer_spec: ModuleSpec,
                 layer_numbers: list[int], has_final_layernorm: bool,
                 final_norm_spec: ModuleSpec) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({
            str(number - 1): build_module(layer_spec, config=config, layer_number=number)
            for number in layer_numbers
        })
        self.final_layernorm = (
            build_module(final_norm_spec, config=config, hidden_size=config.hidden_size)
            if has_final_layernorm else None
        )

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                rotary_pos_emb: torch.Tensor | None = None,
                packed_seq_params: PackedSeqParams | None = None,
                inference_context: InferenceContext | None = None) -> torch.Tensor:
        extra = {} if inference_context is None else {"inference_context": inference_context}
        for layer in self.layers.values():
            hidden_states = layer(hidden_states, attention_mask, rotary_pos_emb,
                                  packed_seq_params, **extra)
        if self.final_layernorm is not None:
            hidden_states = self.final_layernorm(hidden_states)
        return hidden_states
