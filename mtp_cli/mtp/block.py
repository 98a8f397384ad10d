"""The MTP block: this stage's D sequential depths (`mtp.layers.{k}`), Megatron-Core's names.

Depth k feeds depth k+1 its hidden states and the ids and positions rolled k tokens ahead; the
block returns `cat([h0, h1, ..., hD])` for the loss step. `_build_layers` builds the depths
(one, applied at every depth, with `use_repeated_layer`), and `_get_mtp_block_submodules`
accepts either form a block spec takes in Megatron-Core.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mtp_cli.config.schema import ModelConfig
from mtp_cli.mtp.hsm import _mix_hidden_state_history, draw_indices, roll_older
from mtp_cli.mtp.layer import MultiTokenPredictionBlockSubmodules, module_sharded_state_dict
from mtp_cli.mtp.run_state import current_run_state
from mtp_cli.nn.comm import ParallelGroups
from mtp_cli.nn.module_spec import ModuleSpec, build_module
from mtp_cli.nn.packed import PackedSeqParams


def _get_mtp_block_submodules(config: ModelConfig | None,
                              spec: MultiTokenPredictionBlockSubmodules | ModuleSpec,
                              ) -> MultiTokenPredictionBlockSubmodules:
    """The block's submodules from either form a block spec takes (as in Megatron-Core): the
    submodules themselves, or a `ModuleSpec` of `MultiTokenPredictionBlock` carrying them."""
    if isinstance(spec, MultiTokenPredictionBlockSubmodules):
        return spec
    if isinstance(spec, ModuleSpec):
        module = spec.module
        is_block = (module == MultiTokenPredictionBlock.__name__ if isinstance(module, str)
                    else isinstance(module, type) and issubclass(module, MultiTokenPredictionBlock))
        if not is_block:
            raise TypeError(f"an MTP block spec must build MultiTokenPredictionBlock, "
                            f"not {getattr(module, '__name__', module)}")
        submodules = spec.submodules
        if isinstance(submodules, dict):
            submodules = MultiTokenPredictionBlockSubmodules(**submodules)
        if not isinstance(submodules, MultiTokenPredictionBlockSubmodules):
            raise TypeError("the block spec's submodules must be MultiTokenPredictionBlockSubmodules")
        return submodules
    raise TypeError(f"cannot build an MTP block from {type(spec).__name__}")


class MultiTokenPredictionBlock(nn.Module):
    """This stage's MTP depths, keyed by global 0-based index (`mtp.layers.{k}`).

    `spec` is `MultiTokenPredictionBlockSubmodules` or a `ModuleSpec` of this class.
    `use_repeated_layer` builds one layer and applies it at every depth; `detach_heads` trains
    the depths without sending gradients into the main model (h0 and embeddings detached).
    """

    def __init__(self, config: ModelConfig,
                 spec: MultiTokenPredictionBlockSubmodules | ModuleSpec, *,
                 num_depths: int, layer_offset: int = 0, use_repeated_layer: bool = False,
                 detach_heads: bool = False, groups: ParallelGroups | None = None,
                 hsm: bool = False) -> None:
        super().__init__()
        self.config = config
        self.submodules = _get_mtp_block_submodules(config, spec)
        self.num_depths = num_depths
        self.layer_offset = layer_offset
        self.use_repeated_layer = use_repeated_layer
        self.detach_heads = detach_heads
        self.hsm = hsm  # Megatron's mtp_hsm (hsm.py): training only, D >= 2
        self.groups = groups if groups is not None else ParallelGroups()
        self._build_layers(self.groups)

    def _build_layers(self, pg_collection: ParallelGroups | None) -> None:
        """`self.layers`: one layer per depth (one in all when `use_repeated_layer`).

        `pg_collection` is the process-group handles the layers share (Megatron's name).
        """
        specs = self.submodules.layer_specs
        if self.use_repeated_layer:
            specs = specs[:1]
        self.layers = nn.ModuleDict({
            str(self.layer_offset + i): build_module(s, config=self.config,
                                                     layer_number=self.layer_offset + i + 1)
            for i, s in enumerate(specs)
        })
        for layer in self.layers.values():
            layer.mtp_detach_heads = self.detach_heads
            if pg_collection is not None:
                layer.groups = pg_collection

    def share_groups(self, groups: ParallelGroups) -> None:
        """Give the block and every layer `groups` (what `GPTModel.groups = ...` does)."""
        self.groups = groups
        for layer in self.layers.values():
            layer.groups = groups

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict[str, Any]:
        """Megatron-Core's name: the block's DCP-ready state (every depth's, keys `prefix` +
        `layers.{k}.`...), tensor-parallel weights as this rank's shards of the global tensors;
        see `MultiTokenPredictionLayer.sharded_state_dict`."""
        return module_sharded_state_dict(self, prefix)

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
        extra_block_kwargs: dict[str, Any] | None = None,
        embedding: nn.Module | None = None,
    ) -> torch.Tensor:
        """`h0 [s, b, h]` -> `cat([h0, h1, ..., hD]) [(1+D)*s, b, h]`."""
        outputs = [hidden_states]
        hidden = hidden_states.detach() if self.detach_heads else hidden_states
        mixing = self.hsm and self.training and self.num_depths >= 2
        history = [hidden]
        for depth in range(self.num_depths):
            layer_input = hidden
            if mixing and len(history) > 1:  # depth >= 2: candidates aligned on one target
                history = [*roll_older(history, packed_seq_params), history[-1]]
                generator = current_run_state().hsm_generator(hidden.device)
                indices = draw_indices(len(history), hidden, generator)
                layer_input = _mix_hidden_state_history(torch.stack(history[:-1]),
                                                        history[-1], indices)
            hidden, input_ids, position_ids, padding_mask = self.layer_for_depth(depth)(
                input_ids=input_ids, position_ids=position_ids, hidden_states=layer_input,
                attention_mask=attention_mask, padding_mask=padding_mask, context=context,
                context_mask=context_mask, rotary_pos_emb=rotary_pos_emb,
                rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin,
                attention_bias=attention_bias, inference_params=inference_params,
                packed_seq_params=packed_seq_params, sequence_len_offset=sequence_len_offset,
                embedding=embedding, **(extra_block_kwargs or {}),
            )
            outputs.append(hidden)
            if mixing:
                history.append(hidden)
        return torch.cat(outputs, dim=0)
