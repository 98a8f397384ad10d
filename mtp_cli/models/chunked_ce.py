"""Chunked linear cross-entropy: the output projection and the loss together, chunk by chunk.

The plain head materialises `[tokens, V]` logits, their fp32 log-softmax and, in backward, their
gradient, once per head: with D MTP depths, D + 1 times. Here the tokens are swept in chunks of
`chunk_tokens`; only one chunk's `[chunk, V]` logits exist at a time, and what is kept for the
backward pass is `[tokens]`-sized (log-sum-exp) plus, with gradients in the forward, one
`[tokens, h]` input gradient and one `[V, h]` weight gradient per head.

Two ways to get the gradients (`ChunkedCEOptions.grads_in_forward`):

* In the forward pass (Liger-Kernel style). The head's per-token loss `[b, s]` may receive any
  upstream gradient `g`, but in practice `g = c * w` for a known per-token weight `w` and a scalar
  `c` known only at backward time: the trainer's masked mean or sum of the main loss gives
  `c * loss_mask`, and every MTP depth's loss is `mask_k * CE` scaled by `λ/D/N_k` and seeded by
  `MTPLossAutoScaler.main_loss_backward_scale`. So the forward computes the gradients for
  `g = w` (`grad_hint`, the loss mask) and the backward checks that `g` really is `c * w`
  (relative tolerance 1e-6, all tensor-parallel ranks agreeing) and multiplies by `c`. No extra
  matmuls: the step costs what the plain path's does.
* By recomputation: the backward recomputes each chunk's logits from the saved input and the
  log-sum-exp (one extra `[tokens, h] x [h, V]` matmul per head). Used when no hint is given,
  when forward-gradients are switched off, and as the exact fallback when `g` is not `c * w`.
  So the per-token `[b, s]` contract holds for any upstream gradient; the fast path is an
  optimisation, never an approximation beyond the 1e-6 check.

The forward-gradient mode stores one fp32 `[V, h]` weight gradient per head until backward; it
pays off while those of all heads together stay below one `[tokens, V]` logits tensor, which
`grads_in_forward_fits` decides. Logits are computed in the autocast dtype (bf16) like the plain
head's, the softmax and loss in fp32, and the weight gradient is accumulated in fp32.
Tensor-parallel vocab sharding: the statistics are combined over the shards
(`mtp_cli.models.vocab_shard_stats`); the input gradient returned is this shard's part, summed
over the ranks by the caller's mapping (Megatron's `copy_to_tensor_model_parallel_region`, here
the output head's `head_input`), as for any column-parallel linear.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from mtp_cli.models.output import OutputHead
from mtp_cli.models.vocab_shard_stats import (
    IGNORE_INDEX,
    ChunkStats,
    VocabShard,
    all_ranks_agree,
    combine_stats,
    local_stats,
)
from mtp_cli.nn.comm import Group, ModelComm

# `train.loss.chunked: auto` turns chunking on when one head's logits (micro-batch tokens x vocab)
# exceed this many elements (64 MiB in fp32): below it the full logits are cheap and faster.
CHUNKED_AUTO_MIN_LOGITS = 2**24
# Default chunk: this many fp32 logits (128 MiB), i.e. 1024 tokens at vocab 32k, 256 at 128k.
CHUNK_LOGITS = 2**25
_PROPORTIONAL_RTOL = 1e-6


def chunked_enabled(setting: Literal["auto"] | bool, tokens: int, vocab_size: int) -> bool:
    """`train.loss.chunked` for a micro-batch of `tokens` tokens (b x s) and a vocab size."""
    if setting == "auto":
        return tokens * vocab_size > CHUNKED_AUTO_MIN_LOGITS
    return bool(setting)


def grads_in_forward_fits(tokens: int, hidden_size: int, heads: int) -> bool:
    """Whether `heads` stored `[V, h]` weight gradients cost no more than one `[tokens, V]` logits."""
    return heads * hidden_size <= tokens


@dataclass(frozen=True)
class ChunkedCEOptions:
    """How the chunked head runs: tensor-parallel group (and the comm that reduces over it),
    gradient mode, chunk size."""

    tp_group: Group = None
    comm: ModelComm | None = None  # None: `comm_for(tp_group)`
    grads_in_forward: bool = True
    chunk_tokens: int | None = None  # None: CHUNK_LOGITS // local vocab rows


@dataclass
class _Inputs:
    """Flattened `[N, ...]` inputs of one head, cast for the matmuls, and the chunk workspace.

    One fp32 `[chunk, V_local]` buffer (plus one in the compute dtype under autocast) is reused by
    every chunk: fresh `[chunk, V]` allocations would cost a page fault per page on CPU.
    """

    hidden: torch.Tensor  # [N, h] compute dtype
    weight: torch.Tensor  # [V_local, h] compute dtype
    local_labels: torch.Tensor  # [N] row of this shard (clamped)
    here: torch.Tensor  # [N] bool: the label is a row of this shard
    valid: torch.Tensor  # [N] float: 0 where label == IGNORE_INDEX
    shard: VocabShard
    chunk: int
    _buffers: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @classmethod
    def make(cls, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
             options: ChunkedCEOptions) -> _Inputs:
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) \
            else hidden.dtype
        shard = VocabShard.of(weight.shape[0], options.tp_group, options.comm)
        local_labels, here = shard.local_labels(labels)
        chunk = min(options.chunk_tokens or max(1, CHUNK_LOGITS // shard.size), len(labels))
        return cls(hidden.to(dtype), weight.to(dtype), local_labels, here,
                   (labels != IGNORE_INDEX).float(), shard, max(chunk, 1))

    def spans(self) -> list[slice]:
        n = self.hidden.shape[0]
        return [slice(i, min(i + self.chunk, n)) for i in range(0, n, self.chunk)]

    def logits(self, span: slice) -> torch.Tensor:
        """fp32 logits `[C, V_local]` of one chunk (matmul in the compute dtype), in the buffer."""
        if self._buffers is None:
            shape, dtype = (self.chunk, self.shard.size), self.weight.dtype
            low = None if dtype == torch.float32 else self.weight.new_empty(shape)
            self._buffers = (self.weight.new_empty(shape, dtype=torch.float32), low)
        full, low = self._buffers
        rows = span.stop - span.start
        if low is None:
            return torch.mm(self.hidden[span], self.weight.t(), out=full[:rows])
        torch.mm(self.hidden[span], self.weight.t(), out=low[:rows])
        return full[:rows].copy_(low[:rows])

    def low_precision(self, values: torch.Tensor) -> torch.Tensor:
        """`values` in the compute dtype (through the workspace when that is not fp32)."""
        low = self._buffers[1] if self._buffers is not None else None
        return values if low is None else low[: values.shape[0]].copy_(values)


@dataclass
class _Grads:
    """Gradients for per-token weights `row_weights`: input `[N, h]`, local weight `[V_l, h]`."""

    hidden: torch.Tensor | None
    weight: torch.Tensor | None

    @classmethod
    def zeros(cls, inputs: _Inputs, need_hidden: bool, need_weight: bool) -> _Grads:
        def buffer(like: torch.Tensor) -> torch.Tensor:
            return torch.zeros(like.shape, dtype=torch.float32, device=like.device)

        return cls(buffer(inputs.hidden) if need_hidden else None,
                   buffer(inputs.weight) if need_weight else None)

    def add_chunk(self, inputs: _Inputs, span: slice, probs: torch.Tensor,
                  row_weights: torch.Tensor) -> None:
        """d(Σ_t row_weights_t * CE_t)/d(inputs) for one chunk, given its softmax (overwritten)."""
        minus_one = -inputs.here[span].to(probs.dtype).unsqueeze(1)
        probs.scatter_add_(1, inputs.local_labels[span].unsqueeze(1), minus_one)  # - onehot
        grad = inputs.low_precision(probs.mul_((row_weights[span] * inputs.valid[span])[:, None]))
        if self.hidden is not None:
            self.hidden[span] = grad @ inputs.weight
        if self.weight is not None:
            if grad.dtype == torch.float32:
                self.weight.addmm_(grad.t(), inputs.hidden[span])
            else:
                self.weight += (grad.t() @ inputs.hidden[span]).float()


def _forward_sweep(inputs: _Inputs, grads: _Grads | None, row_weights: torch.Tensor | None,
                   ) -> ChunkStats:
    """Loss statistics of every token; with `grads`, also their gradients for `row_weights`.

    Gradients need each chunk's global log-sum-exp at once, so tensor-parallel statistics are
    combined per chunk then; without gradients they are combined once at the end.
    """
    per_chunk: list[ChunkStats] = []
    pending: list[tuple[torch.Tensor, ...]] = []
    for span in inputs.spans():
        logits = inputs.logits(span)
        summary = local_stats(logits, inputs.local_labels[span], inputs.here[span], inputs.shard)
        if grads is None:
            pending.append(summary)
            continue
        stats = combine_stats(*summary, inputs.shard)
        per_chunk.append(stats)
        top = summary[1]  # `logits` now holds exp(logits - top): rescale to the softmax
        probs = logits.mul_(torch.exp(top - stats.lse).unsqueeze(1))
        grads.add_chunk(inputs, span, probs, row_weights)
    if grads is None:
        joined = [torch.cat(parts) for parts in zip(*pending, strict=True)]
        return combine_stats(*joined, inputs.shard)
    return ChunkStats(*(torch.cat(parts) for parts in zip(
        *((s.lse, s.target, s.pred) for s in per_chunk), strict=True)))


def _recompute_grads(inputs: _Inputs, lse: torch.Tensor, row_weights: torch.Tensor,
                     need_hidden: bool, need_weight: bool) -> _Grads:
    """Gradients for `row_weights` from recomputed chunk logits and the saved log-sum-exp."""
    grads = _Grads.zeros(inputs, need_hidden, need_weight)
    for span in inputs.spans():
        probs = inputs.logits(span).sub_(lse[span].unsqueeze(1)).exp_()
        grads.add_chunk(inputs, span, probs, row_weights)
    return grads


def _proportional_scale(grad: torch.Tensor, hint: torch.Tensor, valid: torch.Tensor,
                        shard: VocabShard) -> torch.Tensor | None:
    """`c` with `grad == c * hint` on valid tokens (to 1e-6 relative), else None."""
    g, w = (grad * valid).double(), (hint * valid).double()
    norm = (w * w).sum()
    scale = (g * w).sum() / norm.clamp(min=torch.finfo(torch.float64).tiny)
    residual = (g - scale * w).abs().max() if g.numel() else g.new_zeros(())
    bound = _PROPORTIONAL_RTOL * g.abs().max() if g.numel() else g.new_zeros(())
    ok = bool(residual <= bound)
    return scale.float() if all_ranks_agree(ok, shard, grad.device) else None


class _LinearCrossEntropy(torch.autograd.Function):
    """`(hidden [N, h], weight [V_local, h], labels [N], hint [N] | None, options)` ->
    `(per-token loss [N] fp32, global argmax [N])`."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, hint, options):  # type: ignore[override]
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        inputs = _Inputs.make(hidden, weight, labels, options)
        precompute = options.grads_in_forward and hint is not None and (need_hidden or need_weight)
        grads = _Grads.zeros(inputs, need_hidden, need_weight) if precompute else None
        with torch.autocast(hidden.device.type, enabled=False):
            stats = _forward_sweep(inputs, grads, hint)
        loss = (stats.lse - stats.target) * inputs.valid
        ctx.options, ctx.compute_dtype = options, inputs.weight.dtype
        ctx.precomputed = grads is not None
        ctx.save_for_backward(hidden, weight, labels, stats.lse, hint,
                              grads.hidden if grads else None, grads.weight if grads else None)
        ctx.mark_non_differentiable(stats.pred)
        return loss, stats.pred

    @staticmethod
    def backward(ctx, grad_loss, _grad_pred):  # type: ignore[override]
        hidden, weight, labels, lse, hint, grad_hidden, grad_weight = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(hidden.device.type, enabled=False):
            inputs = _Inputs.make(hidden.to(ctx.compute_dtype), weight.to(ctx.compute_dtype),
                                  labels, ctx.options)
            scale = (_proportional_scale(grad_loss, hint, inputs.valid, inputs.shard)
                     if ctx.precomputed else None)
            if scale is None:
                grads = _recompute_grads(inputs, lse, grad_loss.float(), need_hidden, need_weight)
                grad_hidden, grad_weight = grads.hidden, grads.weight
            else:
                grad_hidden = grad_hidden * scale if need_hidden else None
                grad_weight = grad_weight * scale if need_weight else None
        return (grad_hidden.to(hidden.dtype) if need_hidden else None,
                grad_weight.to(weight.dtype) if need_weight else None, None, None, None)


def chunked_linear_cross_entropy(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    grad_hint: torch.Tensor | None = None,
    options: ChunkedCEOptions | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy `[b, s]` (fp32, unmasked) and argmax `[b, s]` of `hidden @ weight.T`.

    `hidden_states` `[s, b, h]`, `weight` `[V_local, h]` (this rank's vocab rows under tensor
    parallel, `options.tp_group`), `labels` `[b, s]` (global ids). `grad_hint` `[b, s]`: the per-token weights the
    loss is expected to be reduced with (the loss mask); it enables gradients in the forward.
    """
    options = options or ChunkedCEOptions()
    seq_len, batch, hidden_size = hidden_states.shape
    flat_labels = labels.transpose(0, 1).reshape(-1)
    hint = None  # without autograd (evaluation) there is nothing to precompute
    if grad_hint is not None and torch.is_grad_enabled():
        hint = grad_hint.transpose(0, 1).reshape(-1).float()
    loss, pred = _LinearCrossEntropy.apply(
        hidden_states.reshape(-1, hidden_size), weight, flat_labels, hint, options)
    return loss.view(seq_len, batch).transpose(0, 1), pred.view(seq_len, batch).transpose(0, 1)


def chunked_token_loss_and_hits(hidden_states: torch.Tensor, labels: torch.Tensor,
                                mask: torch.Tensor, *, weight: torch.Tensor,
                                options: ChunkedCEOptions | None = None,
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """`process_mtp_loss`'s `token_loss_fn`: per-token loss `[b, s]` and argmax hits on `mask`."""
    loss, pred = chunked_linear_cross_entropy(hidden_states, weight, labels, mask, options)
    return loss, ((pred == labels) & (mask > 0)).sum()


class ChunkedOutputHead:
    """`GPTModel`'s output head with chunked losses: wraps the head it stands in for.

    Same four methods as `mtp_cli.models.output.OutputHead`. Logits (the no-label path) come from
    the wrapped head; the losses of the main head and of every MTP depth are chunked, on the
    wrapped head's `head_input` (sequence-parallel gather / tensor-parallel input mapping) with
    its vocab-shard group. `loss_mask` `[b, s]` hints how the main loss will be reduced.
    """

    def __init__(self, head: OutputHead, options: ChunkedCEOptions,
                 loss_mask: torch.Tensor | None = None) -> None:
        self.head, self.options, self.loss_mask = head, options, loss_mask

    def local_sequence_length(self, seq_len: int) -> int:
        return self.head.local_sequence_length(seq_len)

    def logits(self, hidden_states: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.head.logits(hidden_states, weight)

    def per_token_loss(self, hidden_states: torch.Tensor, labels: torch.Tensor,
                       weight: torch.Tensor) -> torch.Tensor:
        hint = self.loss_mask if self.loss_mask is not None \
            else torch.ones_like(labels, dtype=torch.float32)
        return chunked_linear_cross_entropy(self.head.head_input(hidden_states), weight, labels,
                                            hint, self.options)[0]

    def token_loss_and_hits(self, hidden_states: torch.Tensor, labels: torch.Tensor,
                            mask: torch.Tensor, *, weight: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        return chunked_token_loss_and_hits(self.head.head_input(hidden_states), labels, mask,
                                           weight=weight, options=self.options)
