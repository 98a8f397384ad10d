"""The GPT model with its MTP block, as one stage (or the whole) of the network.

Parameter names follow Megatron-Core's GPT model with its local spec, so state dicts are
interchangeable: `embedding.*`, `decoder.layers.{i}.*`, `decoder.final_layernorm.*`,
`mtp.layers.{k}.*`, `output_layer.weight` (absent when tied to the word embedding).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from mtp_cli.config.schema import ModelConfig, MTPConfig
from mtp_cli.models.chunked_ce import (
    ChunkedCEOptions,
    ChunkedOutputHead,
    chunked_enabled,
    grads_in_forward_fits,
)
from mtp_cli.models.embedding import LanguageModelEmbedding
from mtp_cli.models.inference import InferenceContext
from mtp_cli.models.linear import ColumnParallelLinear
from mtp_cli.models.moe.router import TopKRouter
from mtp_cli.models.output import OutputHead
from mtp_cli.models.rope import rotary_embedding_for
from mtp_cli.models.transformer_layer import TransformerBlock
from mtp_cli.mtp.block import MultiTokenPredictionBlock
from mtp_cli.mtp.distill import MTPDistillation
from mtp_cli.mtp.layer import MultiTokenPredictionBlockSubmodules, MultiTokenPredictionLayer
from mtp_cli.mtp.loss import (
    LossSettings,
    MTPLossSettings,
    labels_from_input_ids,
    process_mtp_loss,
)
from mtp_cli.mtp.run_state import MTPRunState, using_run_state
from mtp_cli.nn.comm import ParallelGroups
from mtp_cli.nn.module_spec import ModuleSpec
from mtp_cli.nn.packed import PackedSeqParams
from mtp_cli.plan.stages import Stage

__all__ = ["GPTModel"]


class GPTModel(nn.Module):
    """Embedding -> decoder layers -> final norm -> [MTP block] -> output head and losses.

    Built from the model settings (`config`) and the MTP architecture (`mtp`: its `num_layers`,
    `use_repeated_layer` and `detach_heads`; λ is a loss setting). What a run decides is set
    from outside, by the run that owns it:

    * `loss_settings` (`LossSettings`): per-token mode, chunked heads, λ - read at every forward;
    * `mtp_state` (`MTPRunState`): the MTP tracker and the autoscaler's scale (None: the
      current run's, `mtp_cli.mtp.run_state`); the forward runs with it active;
    * `groups` (`ParallelGroups`, shared with the MTP layers) and `output_head`: the
      process-group handles and their comm, and the vocab-parallel head, set by `mtp_cli.parallel`.

    Forward contract: `model(input_ids, position_ids, attention_mask=None, *, labels=None,
    loss_mask=None, packed_seq_params=None)`. `attention_mask=None` means causal; a boolean mask
    is True where attention is masked (Megatron's polarity). With labels it returns the
    per-token main loss `[b, s]` (unmasked); without, the logits `[b, s, V]`. The MTP losses go
    into the backward pass through `MTPLossAutoScaler` and into `MTPLossLoggingHelper.tracker`.
    With chunked losses the heads never materialise `[tokens, V]` logits
    (`mtp_cli.models.chunked_ce`); the returned loss and every gradient are the same.
    """

    def __init__(self, config: ModelConfig, layer_spec: ModuleSpec, final_norm_spec: ModuleSpec,
                 mtp_block_spec: MultiTokenPredictionBlockSubmodules | ModuleSpec | None,
                 stage: Stage | None = None, *, mtp: MTPConfig | None = None,
                 loss_settings: LossSettings | None = None) -> None:
        super().__init__()
        mtp = mtp or MTPConfig(num_layers=0)
        stage = stage or Stage.whole_model(config.num_layers, mtp.num_layers)
        self.config, self.stage = config, stage
        self.share_embeddings_and_output_weights = config.share_embeddings_and_output_weights
        self.detach_heads = mtp.detach_heads
        self.loss_settings = loss_settings or LossSettings()
        self.mtp_state: MTPRunState | None = None
        self._groups = ParallelGroups()
        # Validation sets this to log per-depth MTP losses outside training mode.
        self.track_mtp_in_eval = False
        self.output_head = OutputHead()  # tensor parallel swaps in a vocab-parallel head

        self.embedding = LanguageModelEmbedding(config) if stage.needs_embedding else None
        self.rotary_pos_emb = rotary_embedding_for(config)
        self.decoder = TransformerBlock(config, layer_spec, stage.decoder_layers,
                                        stage.final_layernorm, final_norm_spec)
        self.mtp = (
            MultiTokenPredictionBlock(
                config, mtp_block_spec, num_depths=stage.mtp_layers,
                layer_offset=stage.mtp_layer_offset, use_repeated_layer=mtp.use_repeated_layer,
                detach_heads=self.detach_heads, groups=self._groups, hsm=mtp.hsm,
            )
            if mtp_block_spec is not None and stage.mtp_layers > 0 else None
        )
        owns_output_weight = stage.loss and not (
            self.share_embeddings_and_output_weights and self.embedding is not None
        )
        self.output_layer = (
            ColumnParallelLinear(config.hidden_size, config.vocab_size, config=config, bias=False)
            if owns_output_weight else None
        )
        self._share_groups_with_routers()

    # --- what the run and the parallel layout set ---------------------------------------------
    @property
    def groups(self) -> ParallelGroups:
        """Process-group handles and their comm, shared with every MTP layer."""
        return self._groups

    @groups.setter
    def groups(self, value: ParallelGroups) -> None:
        self._groups = value
        if self.mtp is not None:
            self.mtp.share_groups(value)
        self._share_groups_with_routers()

    def _share_groups_with_routers(self) -> None:
        """MoE routers sum their token counts over `groups.tp_cp_group` (split sequences)."""
        for module in self.modules():
            if isinstance(module, TopKRouter):
                module.groups = self._groups

    def output_weight(self) -> torch.Tensor:
        """The output projection `[V, h]`: the word embedding when tied."""
        if self.output_layer is not None:
            return self.output_layer.weight
        return self.embedding.word_embeddings.weight

    def mtp_layers(self) -> list[MultiTokenPredictionLayer]:
        """This stage's MTP layers (each once, also under `use_repeated_layer`)."""
        return [] if self.mtp is None else list(self.mtp.layers.values())

    # --- forward ------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
        hidden_states: torch.Tensor | None = None,
        inference_context: InferenceContext | None = None,
    ) -> torch.Tensor:
        """`hidden_states` is the previous pipeline stage's output on stages after the first;
        a stage without the loss returns its output hidden states for the next stage.
        `inference_context` (decoding, `mtp_cli.generate`): the KV cache the decoder layers
        read and extend; `position_ids` are then the new tokens' positions."""
        if inference_context is not None:
            hidden = self.decode_hidden(input_ids, position_ids, inference_context)
            return self.logits(hidden)
        with using_run_state(self.mtp_state):
            return self._forward(input_ids, position_ids, attention_mask, labels, loss_mask,
                                 packed_seq_params, hidden_states)

    def decode_hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                      inference_context: InferenceContext | None) -> torch.Tensor:
        """The main decoder's output `h0 [s, b, h]` (after the final norm) for new tokens
        `[b, s]` at `position_ids`, attending over the KV cache (None: causal, no cache)."""
        rotary = self.rotary_pos_emb(position_ids) if self.rotary_pos_emb is not None else None
        hidden = self.embedding(input_ids, position_ids)
        return self.decoder(hidden, None, rotary, None, inference_context=inference_context)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[s, b, h]` hidden states (the main model's or a depth's) -> `[b, s, V]` logits
        through the shared output head."""
        return self.output_head.logits(hidden, self.output_weight()).transpose(0, 1)

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None,
                 attention_mask: torch.Tensor | None, labels: torch.Tensor | None,
                 loss_mask: torch.Tensor | None, packed_seq_params: PackedSeqParams | None,
                 hidden_states: torch.Tensor | None) -> torch.Tensor:
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)
            position_ids = position_ids.expand_as(input_ids)
        rotary = self.rotary_pos_emb(position_ids) if self.rotary_pos_emb is not None else None
        if hidden_states is None:
            hidden_states = self.embedding(input_ids, position_ids)
        hidden_states = self.decoder(hidden_states, attention_mask, rotary, packed_seq_params)
        with_mtp = labels is not None or self.training
        if self.mtp is not None and with_mtp:
            hidden_states = self.mtp(
                input_ids, position_ids, hidden_states, attention_mask, embedding=self.embedding,
                rotary_pos_emb=rotary, packed_seq_params=packed_seq_params,
            )
        if not self.stage.loss:
            return hidden_states
        return self.postprocess(hidden_states, input_ids, labels, loss_mask, packed_seq_params,
                                run_mtp=with_mtp and self.stage.mtp_depths_in_loss > 0)

    def postprocess(self, hidden: torch.Tensor, input_ids: torch.Tensor,
                    labels: torch.Tensor | None, loss_mask: torch.Tensor | None,
                    packed_seq_params: PackedSeqParams | None, *, run_mtp: bool) -> torch.Tensor:
        """MTP loss step, then the main head: per-token loss `[b, s]` or logits `[b, s, V]`."""
        weight, head = self.output_weight(), self._loss_head(input_ids.numel(), loss_mask)
        if run_mtp:
            if labels is None:
                mtp_labels, mtp_mask = labels_from_input_ids(
                    input_ids, loss_mask, self.groups.cp_group, packed_seq_params,
                    comm=self.groups.comm)
            else:
                mtp_labels = labels
                mtp_mask = torch.ones_like(labels, dtype=torch.float32) \
                    if loss_mask is None else loss_mask
            head_weight = weight.detach() if self.detach_heads else weight
            distill = MTPDistillation.start(self.loss_settings, head, weight, head_weight, hidden,
                                            self.stage.mtp_depths_in_loss) \
                if self.training else None
            hidden = process_mtp_loss(
                hidden, mtp_labels, mtp_mask, partial(head.token_loss_and_hits, weight=head_weight),
                self._mtp_settings(), training=self.training or self.track_mtp_in_eval,
                packed_seq_params=packed_seq_params, distill=distill,
            )
        elif self.stage.mtp_depths_in_loss > 0 and (
            hidden.shape[0] != head.local_sequence_length(input_ids.shape[1])
        ):
            hidden = hidden.chunk(1 + self.stage.mtp_depths_in_loss, dim=0)[0]
        if labels is None:
            return head.logits(hidden, weight).transpose(0, 1).contiguous()
        return head.per_token_loss(hidden, labels, weight)

    def _loss_head(self, tokens: int, loss_mask: torch.Tensor | None
                   ) -> OutputHead | ChunkedOutputHead:
        """`output_head`, or a chunked head around it for `tokens` (b x s) per micro-batch.

        `loss_settings.chunked == "auto"` chunks when one head's logits exceed
        `CHUNKED_AUTO_MIN_LOGITS` elements. Gradients are computed in the forward pass while the
        stored `[V, h]` weight gradients of all heads stay below one `[tokens, V]` logits tensor.
        """
        settings = self.loss_settings
        if not chunked_enabled(settings.chunked, tokens, self.config.vocab_size):
            return self.output_head
        in_forward = settings.chunked_grads_in_forward
        if in_forward is None:
            heads = 1 + self.stage.mtp_depths_in_loss
            in_forward = grads_in_forward_fits(tokens, self.config.hidden_size, heads)
        head = self.output_head
        options = ChunkedCEOptions(tp_group=head.group, comm=head.comm,
                                   grads_in_forward=in_forward)
        return ChunkedOutputHead(head, options, loss_mask)

    def _mtp_settings(self) -> MTPLossSettings:
        groups = self.groups
        return MTPLossSettings(
            num_depths=self.stage.mtp_depths_in_loss,
            loss_scaling_factor=self.loss_settings.mtp_loss_scaling_factor,
            depth_weights=self.loss_settings.mtp_depth_weights,
            calculate_per_token_loss=self.loss_settings.calculate_per_token_loss,
            cp_group=groups.cp_group, reduce_group=groups.pp_group,
            avg_group=groups.dp_cp_group, comm=groups.comm,
        )
