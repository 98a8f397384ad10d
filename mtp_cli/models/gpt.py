"""The GPT model with its MTP block, as one stage (or the whole) of the network.

Parameter names follow Megatron-Core's GPT model with its local spec, so state dicts are
interchangeable: `embedding.*`, `decoder.layers.{i}.*`, `decoder.final_layernorm.*`,
`mtp.layers.{k}.*`, `output_layer.weight` (absent when tied to the word embedding).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from mtp_cli.config.schema import RunSpec
from mtp_cli.models.chunked_ce import (
    ChunkedCEOptions,
    ChunkedOutputHead,
    chunked_enabled,
    grads_in_forward_fits,
)
from mtp_cli.models.embedding import LanguageModelEmbedding
from mtp_cli.models.linear import ColumnParallelLinear
from mtp_cli.models.output import OutputHead
from mtp_cli.models.rope import rotary_embedding_for
from mtp_cli.models.transformer_layer import TransformerBlock
from mtp_cli.mtp.layer import MultiTokenPredictionBlock, MultiTokenPredictionBlockSubmodules
from mtp_cli.mtp.loss import MTPLossSettings, labels_from_input_ids, process_mtp_loss
from mtp_cli.nn.module_spec import ModuleSpec
from mtp_cli.nn.packed import PackedSeqParams
from mtp_cli.plan.stages import Stage


@dataclass
class ParallelGroups:
    """Process groups the model's forward needs (None = not parallel along that axis)."""

    cp_group: dist.ProcessGroup | None = None
    pp_group: dist.ProcessGroup | None = None
    dp_cp_group: dist.ProcessGroup | None = None


class GPTModel(nn.Module):
    """Embedding -> decoder layers -> final norm -> [MTP block] -> output head and losses.

    Forward contract: `model(input_ids, position_ids, attention_mask=None, *, labels=None,
    loss_mask=None, packed_seq_params=None)`. `attention_mask=None` means causal; a boolean mask
    is True where attention is masked (Megatron's polarity). With labels it returns the
    per-token main loss `[b, s]` (unmasked); without, the logits `[b, s, V]`. The MTP losses go
    into the backward pass through `MTPLossAutoScaler` and into `MTPLossLoggingHelper.tracker`.
    With `train.loss.chunked` the heads never materialise `[tokens, V]` logits
    (`mtp_cli.models.chunked_ce`); the returned loss and every gradient are the same.
    """

    def __init__(self, spec: RunSpec, layer_spec: ModuleSpec, final_norm_spec: ModuleSpec,
                 mtp_block_spec: MultiTokenPredictionBlockSubmodules | None,
                 stage: Stage | None = None) -> None:
        super().__init__()
        config = spec.model
        stage = stage or Stage.whole_model(config.num_layers, spec.mtp.num_layers)
        self.config, self.stage = config, stage
        self.share_embeddings_and_output_weights = config.share_embeddings_and_output_weights
        self.calculate_per_token_loss = spec.train.calculate_per_token_loss
        self.chunked_loss = spec.train.loss.chunked
        self.chunked_grads_in_forward: bool | None = None  # None: grads_in_forward_fits decides
        self.mtp_loss_scaling_factor = spec.mtp.loss_scale_at(0)
        self.detach_heads = spec.mtp.detach_heads
        self.groups = ParallelGroups()
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
                layer_offset=stage.mtp_layer_offset,
                use_repeated_layer=spec.mtp.use_repeated_layer, detach_heads=self.detach_heads,
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

    # --- weights shared between heads -------------------------------------------------------
    def output_weight(self) -> torch.Tensor:
        """The output projection `[V, h]`: the word embedding when tied."""
        if self.output_layer is not None:
            return self.output_layer.weight
        return self.embedding.word_embeddings.weight

    def set_mtp_loss_scaling_factor(self, value: float) -> None:
        """λ for the coming steps (the trainer follows `mtp.loss_scaling_factor`'s schedule)."""
        self.mtp_loss_scaling_factor = float(value)

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
    ) -> torch.Tensor:
        """`hidden_states` is the previous pipeline stage's output on stages after the first;
        a stage without the loss returns its output hidden states for the next stage."""
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
                cp_group=self.groups.cp_group,
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
                    input_ids, loss_mask, self.groups.cp_group, packed_seq_params)
            else:
                mtp_labels = labels
                mtp_mask = torch.ones_like(labels, dtype=torch.float32) \
                    if loss_mask is None else loss_mask
            head_weight = weight.detach() if self.detach_heads else weight
            hidden = process_mtp_loss(
                hidden, mtp_labels, mtp_mask, partial(head.token_loss_and_hits, weight=head_weight),
                self._mtp_settings(), training=self.training or self.track_mtp_in_eval,
                packed_seq_params=packed_seq_params,
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

        `train.loss.chunked: auto` chunks when one head's logits exceed
        `CHUNKED_AUTO_MIN_LOGITS` elements. Gradients are computed in the forward pass while the
        stored `[V, h]` weight gradients of all heads stay below one `[tokens, V]` logits tensor.
        """
        if not chunked_enabled(self.chunked_loss, tokens, self.config.vocab_size):
            return self.output_head
        in_forward = self.chunked_grads_in_forward
        if in_forward is None:
            heads = 1 + self.stage.mtp_depths_in_loss
            in_forward = grads_in_forward_fits(tokens, self.config.hidden_size, heads)
        options = ChunkedCEOptions(tp_group=self.output_head.group, grads_in_forward=in_forward)
        return ChunkedOutputHead(self.output_head, options, loss_mask)

    def _mtp_settings(self) -> MTPLossSettings:
        return MTPLossSettings(
            num_depths=self.stage.mtp_depths_in_loss,
            loss_scaling_factor=self.mtp_loss_scaling_factor,
            calculate_per_token_loss=self.calculate_per_token_loss,
            cp_group=self.groups.cp_group,
            reduce_group=self.groups.pp_group,
            avg_group=self.groups.dp_cp_group,
        )
