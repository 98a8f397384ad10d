"""The MTP layer (one depth) and the block of D sequential depths (DeepSeek-V3 style).

Depth k takes the hidden states of depth k-1 (`h0` is the main decoder's output after its final
norm) and the embedding of the input shifted k tokens ahead, and predicts token `i+k+1` at
position `i`:

    e  = enorm(embedding(roll(ids), roll(positions)))     the main model's embedding, shared
    x  = eh_proj(cat([e, hnorm(h_{k-1})]))                embedding first, hidden second
    h_k = final_layernorm(transformer_layer(x))           main attention mask, unshifted RoPE
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mtp_cli.config.schema import ModelConfig
from mtp_cli.mtp.roll import roll_tensor
from mtp_cli.nn.module_spec import ModuleSpec, build_module, register_module
from mtp_cli.nn.packed import PackedSeqParams

# Megatron-Core 0.19 names the MTP transformer layer `mtp_model_layer` in memory.
LEGACY_TRANSFORMER_LAYER_NAME = "mtp_model_layer"


@dataclass
class MultiTokenPredictionLayerSubmodules:
    enorm: Any = None
    hnorm: Any = None
    eh_proj: Any = None
    transformer_layer: Any = None
    layer_norm: Any = None


@dataclass
class MultiTokenPredictionBlockSubmodules:
    layer_specs: list[ModuleSpec] = field(default_factory=list)


def _accept_legacy_layer_name(state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load `...mtp_model_layer.*` (Megatron-Core 0.19 in memory) as `...transformer_layer.*`."""
    legacy = f"{prefix}{LEGACY_TRANSFORMER_LAYER_NAME}."
    for key in [k for k in state_dict if k.startswith(legacy)]:
        state_dict[f"{prefix}transformer_layer.{key[len(legacy):]}"] = state_dict.pop(key)


@register_module(submodules=MultiTokenPredictionLayerSubmodules)
class MultiTokenPredictionLayer(nn.Module):
    """One MTP depth. `layer_number` is the 1-based global MTP index."""

    def __init__(self, config: ModelConfig, submodules: MultiTokenPredictionLayerSubmodules,
                 layer_number: int = 1) -> None:
        super().__init__()
        h = config.hidden_size
        self.layer_number = layer_number
        self.enorm = build_module(submodules.enorm, config=config, hidden_size=h)
        self.hnorm = build_module(submodules.hnorm, config=config, hidden_size=h)
        self.eh_proj = build_module(submodules.eh_proj, 2 * h, h, config=config, bias=False)
        self.transformer_layer = build_module(
            submodules.transformer_layer, config=config,
            layer_number=config.num_layers + layer_number,
        )
        self.final_layernorm = build_module(submodules.layer_norm, config=config, hidden_size=h)
        self._register_load_state_dict_pre_hook(_accept_legacy_layer_name)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *,
        embedding: nn.Module,
        rotary_pos_emb: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
        cp_group: dist.ProcessGroup | None = None,
        padding_mask: torch.Tensor | None = None,
        detach_embedding: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Returns `(h_k, rolled ids, rolled positions, rolled padding mask)` for depth k+1."""
        input_ids, _ = roll_tensor(input_ids, -1, -1, cp_group, packed_seq_params)
        position_ids, _ = roll_tensor(position_ids, -1, -1, cp_group, packed_seq_params)
        if padding_mask is not None:
            padding_mask, _ = roll_tensor(padding_mask, -1, -1, cp_group, packed_seq_params)
        decoder_input = embedding(input_ids, position_ids)  # [s, b, h]
        if detach_embedding:
            decoder_input = decoder_input.detach()
        x = torch.cat([self.enorm(decoder_input), self.hnorm(hidden_states)], dim=-1)
        x = self.eh_proj(x)
        x = self.transformer_layer(x, attention_mask, rotary_pos_emb, packed_seq_params)
        return self.final_layernorm(x), input_ids, position_ids, padding_mask


class MultiTokenPredictionBlock(nn.Module):
    """This stage's MTP depths, keyed by global 0-based index (`mtp.layers.{k}`).

    `use_repeated_layer` builds one layer and applies it at every depth; `detach_heads` trains
    the depths without sending gradients into the main model (h0 and embeddings detached).
    """

    def __init__(self, config: ModelConfig, spec: MultiTokenPredictionBlockSubmodules, *,
                 num_depths: int, layer_offset: int = 0, use_repeated_layer: bool = False,
                 detach_heads: bool = False) -> None:
        super().__init__()
        self.num_depths = num_depths
        self.layer_offset = layer_offset
        self.use_repeated_layer = use_repeated_layer
        self.detach_heads = detach_heads
        specs = spec.layer_specs[:1] if use_repeated_layer else spec.layer_specs
        self.layers = nn.ModuleDict({
            str(layer_offset + i): build_module(s, config=config,
                                                layer_number=layer_offset + i + 1)
            for i, s in enumerate(specs)
        })

    def layer_for_depth(self, depth: int) -> nn.Module:
        """The module computing local depth `depth` (0-based)."""
        if self.use_repeated_layer:
            return next(iter(self.layers.values()))
        return self.layers[str(self.layer_offset + depth)]

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *,
        embedding: nn.Module,
        rotary_pos_emb: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
        cp_group: dist.ProcessGroup | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`h0 [s, b, h]` -> `cat([h0, h1, ..., hD]) [(1+D)*s, b, h]`."""
        outputs = [hidden_states]
        hidden = hidden_states.detach() if self.detach_heads else hidden_states
        for depth in range(self.num_depths):
            hidden, input_ids, position_ids, padding_mask = self.layer_for_depth(depth)(
                input_ids, position_ids, hidden, attention_mask, embedding=embedding,
                rotary_pos_emb=rotary_pos_emb, packed_seq_params=packed_seq_params,
                cp_group=cp_group, padding_mask=padding_mask,
                detach_embedding=self.detach_heads,
            )
            outputs.append(hidden)
        return torch.cat(outputs, dim=0)


def get_mtp_layer_spec_for_backend(transformer_layer_spec: ModuleSpec,
                                   backend: Any = None) -> ModuleSpec:
    """An MTP layer spec around `transformer_layer_spec` (the decoder's last layer spec).

    `backend` is a `BackendSpecProvider` whose classes fill the slots directly; without one the
    spec keeps the `backend.*` slots, to be resolved when the model is built.
    """

    def slot(name: str) -> ModuleSpec:
        if backend is None:
            return ModuleSpec(f"backend.{name}")
        return ModuleSpec(getattr(backend, name)())

    return ModuleSpec(
        module="MultiTokenPredictionLayer",
        submodules={
            "enorm": slot("layer_norm"),
            "hnorm": slot("layer_norm"),
            "eh_proj": slot("column_parallel_linear"),
            "transformer_layer": transformer_layer_spec,
            "layer_norm": slot("layer_norm"),
        },
    )


def get_mtp_layer_spec(transformer_layer_spec: ModuleSpec,
                       use_transformer_engine: bool = False) -> ModuleSpec:
    """Megatron's entry point: the MTP layer spec for the TE or the local backend."""
    from mtp_cli.build.backends import LocalSpecProvider, TESpecProvider

    provider = TESpecProvider() if use_transformer_engine else LocalSpecProvider()
    return get_mtp_layer_spec_for_backend(transformer_layer_spec, provider)


def get_mtp_block_spec(mtp_layer_spec: ModuleSpec, num_layers_to_build: int
                       ) -> MultiTokenPredictionBlockSubmodules | None:
    """D copies of the layer spec on the stage that builds MTP layers; None elsewhere."""
    if num_layers_to_build <= 0:
        return None
    return MultiTokenPredictionBlockSubmodules(layer_specs=[mtp_layer_spec] * num_layers_to_build)
