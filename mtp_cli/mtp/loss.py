"""The MTP loss step (Megatron-Core's `process_mtp_loss` semantics).

For depth k the labels and the loss mask are rolled once more (cumulatively), the depth's
per-token loss `L_k = mask_k * CE(logits_k, labels_k)` is logged as `sum(L_k) / max(N_k, 1)` and
injected into the backward pass of the main loss through `MTPLossAutoScaler`, weighted so that
the objective of a micro-batch is

    L_main + (λ/D) Σ_k sum(L_k) / max(N_k, 1)              (per-micro-batch mode)
    L_main + (λ/D) Σ_k sum(L_k) * N0 / max(N_k, 1)         (per-token mode; L_main a sum)

With `mtp.distill` (`mtp_cli.mtp.distill`) the per-token loss is
`L_k = mask_k * (CE + w * KL_k)`, KL_k from the main model's logits rolled like the labels.

With `mtp.depth_weights` each depth's term is multiplied by its w_k (a depth past the weights
in force gets 0: its loss is still computed and logged, but trains nothing); unset, every
w_k is 1 and the arithmetic is Megatron's, untouched.

Under context parallel the sums and counts are all-reduced over the CP group before dividing,
so the losses do not depend on how a sequence is sharded (a deliberate departure from the
reference, which divides by rank-local counts). Those sums, and the rolls' boundary exchange, go
through the settings' `ModelComm` (`mtp_cli.nn.comm`); this module calls no collective itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from mtp_cli.mtp.autoscaler import MTPLossAutoScaler
from mtp_cli.mtp.logging_helper import MTPLossLoggingHelper
from mtp_cli.mtp.roll import roll_tensor
from mtp_cli.nn.comm import Group, ModelComm, comm_for
from mtp_cli.nn.packed import PackedSeqParams

if TYPE_CHECKING:
    from mtp_cli.mtp.distill import MTPDistillation

# (hidden [s, b, h], labels [b, s], mask [b, s]) -> (per-token loss [b, s], argmax hits)
TokenLossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LossSettings:
    """How a run computes its losses: owned by the run (the engine), read by the model at every
    forward, so the model is built from model settings only.

    `mtp_loss_scaling_factor` is λ in force (the engine follows `mtp.loss_scaling_factor`'s
    schedule by updating this object, shared by all its model chunks);
    `calculate_per_token_loss` is Megatron's per-token mode; `chunked` is `train.loss.chunked`
    and `chunked_grads_in_forward` the chunked head's gradient mode (None: by size);
    `mtp_distill*` are `mtp.distill`, its weight w and temperature T (`mtp_cli.mtp.distill`).
    """

    mtp_loss_scaling_factor: float = 0.1
    mtp_depth_weights: tuple[float, ...] | None = None  # w_k in force (None: all 1)
    calculate_per_token_loss: bool = False
    chunked: Literal["auto"] | bool = "auto"
    chunked_grads_in_forward: bool | None = None
    mtp_distill: bool = False
    mtp_distill_weight: float = 1.0
    mtp_distill_temperature: float = 1.0


@dataclass
class MTPLossSettings:
    """What the loss step needs to know besides the tensors."""

    num_depths: int
    loss_scaling_factor: float
    calculate_per_token_loss: bool = False
    cp_group: Group = None
    reduce_group: Group = None  # pipeline group, for the tracker
    avg_group: Group = None  # data x context parallel group
    comm: ModelComm | None = None  # reduces over cp_group (None: `comm_for(cp_group)`)
    depth_weights: tuple[float, ...] | None = None  # w_k; depths past it get 0 (None: all 1)


def _cp_sum(value: torch.Tensor, cp_group: Group, comm: ModelComm | None) -> torch.Tensor:
    """Sum a (detached) statistic over the context-parallel group."""
    comm = comm_for(cp_group, comm)
    if comm.size(cp_group) == 1:
        return value
    return comm.all_reduce(value.detach().clone(), cp_group)


def labels_from_input_ids(input_ids: torch.Tensor, loss_mask: torch.Tensor | None,
                          cp_group: Group = None,
                          packed_seq_params: PackedSeqParams | None = None,
                          *, comm: ModelComm | None = None,
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token labels and their loss mask when the caller gave none (both rolled once)."""
    labels, _ = roll_tensor(input_ids, -1, -1, cp_group, packed_seq_params, comm=comm)
    if loss_mask is None:
        loss_mask = torch.ones_like(input_ids, dtype=torch.float32)
    loss_mask, _ = roll_tensor(loss_mask, -1, -1, cp_group, packed_seq_params, comm=comm)
    return labels, loss_mask


def _weight(weights: tuple[float, ...], depth: int) -> float:
    return weights[depth] if depth < len(weights) else 0.0


def process_mtp_loss(
    hidden_states: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    token_loss_fn: TokenLossFn,
    settings: MTPLossSettings,
    *,
    training: bool = True,
    packed_seq_params: PackedSeqParams | None = None,
    distill: MTPDistillation | None = None,
) -> torch.Tensor:
    """Split `[(1+D)*s, b, h]`, compute and inject every depth's loss; return `h0`.

    `token_loss_fn` computes the head's per-token cross-entropy and argmax hits for one depth.
    `distill` (`mtp.distill`) adds each depth's weighted KL from the main model's rolled logits
    to its per-token loss, under the same mask and normalisation; the logged `mtp_k loss` stays
    the cross-entropy and the KL is logged beside it.
    Returns the main hidden states `h0` carrying the MTP terms for the backward pass.
    """
    depths = settings.num_depths
    chunks = hidden_states.chunk(1 + depths, dim=0)
    main_hidden = chunks[0]
    cp_group, comm = settings.cp_group, settings.comm
    num_tokens_main = _cp_sum(loss_mask.sum().float(), cp_group, comm)
    mtp_labels, mtp_mask = labels, loss_mask.float()
    scale = settings.loss_scaling_factor / depths
    for depth in range(depths):
        mtp_labels, _ = roll_tensor(mtp_labels, -1, -1, cp_group, packed_seq_params, comm=comm)
        mtp_mask, num_tokens = roll_tensor(mtp_mask, -1, -1, cp_group, packed_seq_params,
                                           comm=comm)
        if distill is None:
            per_token, correct = token_loss_fn(chunks[depth + 1], mtp_labels, mtp_mask)
        else:
            per_token, correct, kl = distill.depth_losses(
                chunks[depth + 1], mtp_labels, mtp_mask, cp_group, packed_seq_params, comm)
        per_token = mtp_mask * per_token
        num_tokens = _cp_sum(num_tokens.float(), cp_group, comm).clamp(min=1)
        if training:
            loss_sum = _cp_sum(per_token.detach().sum(), cp_group, comm)
            MTPLossLoggingHelper.save_loss_to_tracker(
                loss_sum / num_tokens, depth, depths,
                reduce_group=settings.reduce_group, avg_group=settings.avg_group,
            )
            MTPLossLoggingHelper.save_acceptance_to_tracker(correct, mtp_mask.sum(), depth, depths)
        if distill is not None:
            kl = mtp_mask * kl
            if training:
                kl_sum = _cp_sum(kl.detach().sum(), cp_group, comm)
                MTPLossLoggingHelper.save_distill_to_tracker(kl_sum / num_tokens, depth, depths)
            per_token = per_token + distill.weight * kl
        depth_scale = scale if settings.depth_weights is None else \
            scale * _weight(settings.depth_weights, depth)
        if settings.calculate_per_token_loss:
            normalized = depth_scale * per_token * (num_tokens_main / num_tokens)
        else:
            normalized = depth_scale * per_token / num_tokens
        main_hidden = MTPLossAutoScaler.apply(main_hidden, normalized)
    return main_hidden
