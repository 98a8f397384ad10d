"""The MTP layer (one depth) and the block of D sequential depths (DeepSeek-V3 style).

Depth k takes the hidden states of depth k-1 (`h0` is the main decoder's output after its final
norm) and the embedding of the input shifted k tokens ahead, and predicts token `i+k+1` at
position `i`:

    e  = enorm(embedding(roll(ids), roll(positions)))     the main model's embedding, shared
    x  = eh_proj(cat([e, hnorm(h_{k-1})]))                embedding first, hidden second
    h_k = final_layernorm(transformer_layer(x))           main attention mask, unshifted RoPE

The block of D depths is in `mtp_cli.mtp.block`. The layer keeps Megatron-Core's decomposition and signatures - `_get_embeddings` (the rolls and
the embedding), `_concat_embeddings` (norms, concatenation, `eh_proj`),
`_proj_and_transformer_layer` (that, the transformer layer and `_postprocess`), `_postprocess`
(the final norm) and `_checkpointed_forward` (the same under activation recomputation) - so a
subclass overriding one of them works as it does in Megatron-Core. Process groups reach the
layer as opaque handles in `groups` (shared with `GPTModel.groups`), with the `ModelComm` that
understands them; the layer calls no collective itself.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mtp_cli.config.schema import ModelConfig
from mtp_cli.models.backends import LocalSpecProvider, TESpecProvider
from mtp_cli.models.moe.aux_losses import recompute_contexts
from mtp_cli.mtp.roll import roll_tensor
from mtp_cli.nn.comm import Group, ModelComm, ParallelGroups
from mtp_cli.nn.module_spec import ModuleSpec, build_module, register_module
from mtp_cli.nn.packed import PackedSeqParams
from mtp_cli.nn.sharding import LinearSplit, TensorParallelRule

# Megatron-Core 0.19 names the MTP transformer layer `mtp_model_layer` in memory.
LEGACY_TRANSFORMER_LAYER_NAME = "mtp_model_layer"
# Attention masks an MTP layer's transformer layer may use (Megatron-Core's AttnMaskType names).
SUPPORTED_ATTN_MASK = ["padding", "causal", "no_mask", "padding_causal"]
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


def module_sharded_state_dict(module: nn.Module, prefix: str = "") -> dict[str, Any]:
    """`module`'s state under `prefix` + local names, each value as DCP should get it.

    Under tensor parallel, `attach_state_sharders` (`mtp_cli.checkpoint.sharded_state`) sets
    `module.state_sharder` (global-name aware: it knows the module's path), which turns a sharded
    weight into this rank's shards of the global tensor; without it the values are the tensors
    themselves. The values are views of the parameters, so loading
    them with DCP writes straight into the model.
    """
    sharder = getattr(module, "state_sharder", None)
    return {prefix + name: sharder(name, value) if sharder is not None else value
            for name, value in module.state_dict().items()}


def attn_mask_type_of(transformer_layer_spec: Any) -> str | None:
    """The `attn_mask_type` a transformer-layer spec gives its self-attention, if it says."""
    submodules = getattr(transformer_layer_spec, "submodules", None)
    if isinstance(submodules, dict):
        attention = submodules.get("self_attention")
    else:
        attention = getattr(submodules, "self_attention", None)
    params = getattr(attention, "params", None) or {}
    mask = params.get("attn_mask_type")
    return getattr(mask, "name", mask)  # an enum member or its name


def _reject_unsupported(**arguments: Any) -> None:
    """Reference arguments this implementation does not use must not be silently dropped."""
    given = sorted(name for name, value in arguments.items() if value is not None)
    if given:
        raise NotImplementedError(f"MultiTokenPredictionLayer does not support {', '.join(given)}")


@register_module(submodules=MultiTokenPredictionLayerSubmodules)
class MultiTokenPredictionLayer(nn.Module):
    """One MTP depth. `layer_number` is the 1-based global MTP index.

    Set from outside: `groups` (the model's process-group handles and their comm),
    `state_sharder` (for `sharded_state_dict`, by `mtp_cli.checkpoint.sharded_state`),
    `mtp_detach_heads` (by the block) and `recompute_granularity` ("full": `forward` goes through
    `_checkpointed_forward` in training; `mtp_cli.parallel.recompute` sets it).
    """

    def __init__(self, config: ModelConfig, submodules: MultiTokenPredictionLayerSubmodules,
                 layer_number: int = 1) -> None:
        super().__init__()
        mask = attn_mask_type_of(submodules.transformer_layer)
        if mask is not None and mask not in SUPPORTED_ATTN_MASK:
            raise ValueError(f"Multi-Token Prediction does not support the {mask!r} attention "
                             f"mask; supported: {SUPPORTED_ATTN_MASK}")
        h = config.hidden_size
        self.config = config
        self.submodules = submodules
        self.layer_number = layer_number
        self.groups = ParallelGroups()
        self.mtp_detach_heads = False
        self.recompute_granularity: str | None = None
        self.enorm = build_module(submodules.enorm, config=config, hidden_size=h)
        self.hnorm = build_module(submodules.hnorm, config=config, hidden_size=h)
        self.eh_proj = build_module(submodules.eh_proj, 2 * h, h, config=config, bias=False)
        self.transformer_layer = build_module(
            submodules.transformer_layer, config=config,
            layer_number=config.num_layers + layer_number,
        )
        self.final_layernorm = build_module(submodules.layer_norm, config=config, hidden_size=h)
        self._register_load_state_dict_pre_hook(_accept_legacy_layer_name)

    def tensor_parallel_rule(self) -> TensorParallelRule:
        """`eh_proj` column-parallel with its output gathered: the transformer layer after it
        takes the whole hidden state, as the decoder's layers do."""
        return TensorParallelRule(linears=(LinearSplit("eh_proj", "column", gather_output=True),))

    @property
    def cp_group(self) -> Group:
        """The context-parallel group handle (None: the whole sequence is here)."""
        return self.groups.cp_group

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict[str, Any]:
        """Megatron-Core's name: this layer's DCP-ready state, keys `prefix` + local names,
        tensor-parallel weights as this rank's shards of the canonical global tensors.

        `sharded_offsets` and `metadata` are accepted for the reference signature; the layer
        numbers in the keys are already global (the caller's `prefix`, e.g. `mtp.layers.3.`).
        """
        return module_sharded_state_dict(self, prefix)

    @property
    def comm(self) -> ModelComm | None:
        return self.groups.comm

    def _get_embeddings(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        embedding: nn.Module,
        hidden_states: torch.Tensor,
        packed_seq_params: PackedSeqParams | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Roll ids, positions (and padding mask) one more token ahead and embed them.

        Returns `(input_ids, position_ids, padding_mask, decoder_input, hidden_states)`.
        """
        def roll(tensor: torch.Tensor) -> torch.Tensor:
            return roll_tensor(tensor, -1, -1, self.cp_group, packed_seq_params,
                               comm=self.comm)[0]

        input_ids, position_ids = roll(input_ids), roll(position_ids)
        if padding_mask is not None:
            padding_mask = roll(padding_mask)
        decoder_input = embedding(input_ids, position_ids)  # [s, b, h]
        if self.mtp_detach_heads:
            decoder_input = decoder_input.detach()
        return input_ids, position_ids, padding_mask, decoder_input, hidden_states

    def _concat_embeddings(self, hidden_states: torch.Tensor, decoder_input: torch.Tensor
                           ) -> torch.Tensor:
        """`eh_proj(cat([enorm(e), hnorm(h)]))`: embedding first, hidden second."""
        decoder_input = self.enorm(decoder_input)
        hidden_states = self.hnorm(hidden_states)
        return self.eh_proj(torch.cat((decoder_input, hidden_states), -1))

    def _proj_and_transformer_layer(
        self,
        hidden_states: torch.Tensor,
        decoder_input: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        rotary_pos_emb: torch.Tensor | None = None,
        rotary_pos_cos: torch.Tensor | None = None,
        rotary_pos_sin: torch.Tensor | None = None,
        attention_bias: torch.Tensor | None = None,
        inference_params: Any = None,
        packed_seq_params: PackedSeqParams | None = None,
        sequence_len_offset: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`_concat_embeddings`, the transformer layer, then `_postprocess`.

        `inference_params` is a KV cache (`mtp_cli.models.inference.InferenceContext`): as in
        Megatron-Core it reaches the transformer layer as its `inference_context`, so a depth
        attends over its own cached positions while decoding."""
        _reject_unsupported(context=context, context_mask=context_mask,
                            rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin,
                            attention_bias=attention_bias,
                            sequence_len_offset=sequence_len_offset)
        hidden_states = self._concat_embeddings(hidden_states, decoder_input)
        extra = {} if inference_params is None else {"inference_context": inference_params}
        hidden_states = self.transformer_layer(hidden_states, attention_mask, rotary_pos_emb,
                                               packed_seq_params, **extra)
        return self._postprocess(hidden_states)

    def _postprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The final norm before the shared output head."""
        return self.final_layernorm(hidden_states)

    def _checkpointed_forward(
        self,
        hidden_states: torch.Tensor,
        decoder_input: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        rotary_pos_emb: torch.Tensor | None = None,
        rotary_pos_cos: torch.Tensor | None = None,
        rotary_pos_sin: torch.Tensor | None = None,
        attention_bias: torch.Tensor | None = None,
        inference_params: Any = None,
        packed_seq_params: PackedSeqParams | None = None,
        sequence_len_offset: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`_proj_and_transformer_layer` under activation recomputation: only its inputs are
        kept, and backward runs it again (torch.utils.checkpoint, non-reentrant, RNG restored).
        Non-tensor arguments travel in the closure, tensors positionally, as in Megatron-Core."""

        def custom_forward(hidden_states, decoder_input, attention_mask, padding_mask, context,
                           context_mask, rotary_pos_emb, rotary_pos_cos, rotary_pos_sin,
                           sequence_len_offset):
            return self._proj_and_transformer_layer(
                hidden_states=hidden_states, decoder_input=decoder_input,
                attention_mask=attention_mask, padding_mask=padding_mask, context=context,
                context_mask=context_mask, rotary_pos_emb=rotary_pos_emb,
                rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin,
                attention_bias=attention_bias, inference_params=inference_params,
                packed_seq_params=packed_seq_params, sequence_len_offset=sequence_len_offset,
            )

        return checkpoint(custom_forward, hidden_states, decoder_input, attention_mask,
                          padding_mask, context, context_mask, rotary_pos_emb, rotary_pos_cos,
                          rotary_pos_sin, sequence_len_offset, use_reentrant=False,
                          context_fn=functools.partial(recompute_contexts, self))

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        padding_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        rotary_pos_emb: torch.Tensor | None = None,
        rotary_pos_cos: torch.Tensor | None = None,
        rotary_pos_sin: torch.Tensor | None = None,
        attention_bias: torch.Tensor | None = None,
        inference_params: Any = None,
        packed_seq_params: PackedSeqParams | None = None,
        sequence_len_offset: torch.Tensor | None = None,
        embedding: nn.Module | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Returns `(h_k, rolled ids, rolled positions, rolled padding mask)` for depth k+1."""
        if context is not None:
            raise NotImplementedError("multi token prediction + cross attention is not supported")
        input_ids, position_ids, padding_mask, decoder_input, hidden_states = self._get_embeddings(
            input_ids=input_ids, position_ids=position_ids, embedding=embedding,
            hidden_states=hidden_states, packed_seq_params=packed_seq_params,
            padding_mask=padding_mask,
        )
        step = (self._checkpointed_forward
                if self.recompute_granularity == "full" and self.training
                else self._proj_and_transformer_layer)
        hidden_states = step(
            hidden_states=hidden_states, decoder_input=decoder_input,
            attention_mask=attention_mask, padding_mask=padding_mask, context=context,
            context_mask=context_mask, rotary_pos_emb=rotary_pos_emb,
            rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin,
            attention_bias=attention_bias, inference_params=inference_params,
            packed_seq_params=packed_seq_params, sequence_len_offset=sequence_len_offset,
        )
        return hidden_states, input_ids, position_ids, padding_mask


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
    provider = TESpecProvider() if use_transformer_engine else LocalSpecProvider()
    return get_mtp_layer_spec_for_backend(transformer_layer_spec, provider)


def get_mtp_block_spec(mtp_layer_spec: ModuleSpec, num_layers_to_build: int
                       ) -> MultiTokenPredictionBlockSubmodules | None:
    """D copies of the layer spec on the stage that builds MTP layers; None elsewhere."""
    if num_layers_to_build <= 0:
        return None
    return MultiTokenPredictionBlockSubmodules(layer_specs=[mtp_layer_spec] * num_layers_to_build)
