"""Vocabulary-parallel embedding, output head, cross-entropy and argmax.

Rank r holds rows `[r*V/tp, (r+1)*V/tp)` of the word embedding (and of the output layer). The
embedding looks up the ids in its range and sums over the ranks. The head computes only this
rank's logits `[s, b, V/tp]`; the cross-entropy and the argmax for MTP acceptance counts reduce
over the ranks (max, sum of exponentials, the target's logit; the winning index), so the full
logits are never gathered: only the no-label path, which returns logits, gathers them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mtp_cli.parallel.comm import DIST_COMM
from mtp_cli.parallel.tp_mappings import (
    all_reduce,
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    gather_last_dim,
    group_rank,
    group_size,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from mtp_cli.parallel.tp_sharding import VOCAB


def vocab_range(local_vocab: int, group: dist.ProcessGroup) -> tuple[int, int]:
    """`[start, end)` of the vocabulary rows this rank holds."""
    start = group_rank(group) * local_vocab
    return start, start + local_vocab


class VocabParallelEmbedding(nn.Module):
    """This rank's rows of the word embedding; `forward` gives partial sums over the ranks."""

    def __init__(self, source: nn.Embedding, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.num_embeddings = source.num_embeddings
        self.weight = nn.Parameter(VOCAB.shard_for(source.weight.detach(), group),
                                   requires_grad=source.weight.requires_grad)
        self.vocab_start, self.vocab_end = vocab_range(self.weight.shape[0], group)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """`[b, s]` ids -> `[b, s, h]`: the embedding of ids in range, zero for the others."""
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local_ids = (input_ids - self.vocab_start).masked_fill(outside, 0)
        return F.embedding(local_ids, self.weight).masked_fill(outside[..., None], 0.0)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.weight.shape[1]}, rows=[{self.vocab_start}, " \
               f"{self.vocab_end})"


class TensorParallelEmbedding(nn.Module):
    """`LanguageModelEmbedding` with a vocab-parallel word embedding (same submodule names).

    Output `[s, b, h]`, replicated over the TP ranks; with sequence parallel this rank's
    sequence slice `[s/tp, b, h]` (the word embedding is reduce-scattered and the replicated
    position table is looked up for the local positions only, as the rest of the sequence-
    parallel region: its gradient is then partial per rank and summed by
    `sync_sequence_parallel_grads`).
    """

    def __init__(self, source: nn.Module, group: dist.ProcessGroup,
                 sequence_parallel: bool) -> None:
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.word_embeddings = VocabParallelEmbedding(source.word_embeddings, group)
        self.position_embeddings = source.position_embeddings
        self.embedding_dropout = source.embedding_dropout

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        partial = self.word_embeddings(input_ids).transpose(0, 1)  # [s, b, h], a partial sum
        if self.sequence_parallel:
            embeddings = reduce_scatter_to_sequence_parallel_region(partial, self.group)
            if position_ids is not None:
                local = embeddings.shape[0]
                start = group_rank(self.group) * local
                position_ids = position_ids[:, start:start + local]
        else:
            embeddings = reduce_from_tensor_parallel_region(partial, self.group)
        if self.position_embeddings is not None:
            embeddings = embeddings + self.position_embeddings(position_ids).transpose(0, 1)
        return self.embedding_dropout(embeddings.contiguous())


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of vocab-sharded logits, in fp32, without gathering them."""

    @staticmethod
    def forward(ctx, logits, target, vocab_start, group):  # type: ignore[override]
        ctx.input_dtype = logits.dtype
        logits = logits.float()
        logits_max = all_reduce(logits.max(dim=-1).values, group, dist.ReduceOp.MAX)
        shifted = logits - logits_max[..., None]
        outside = (target < vocab_start) | (target >= vocab_start + logits.shape[-1])
        local_target = (target - vocab_start).masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local_target[..., None]).squeeze(-1)
        target_logit = all_reduce(target_logit.masked_fill(outside, 0.0), group)
        exp = shifted.exp()
        sum_exp = all_reduce(exp.sum(dim=-1), group)
        softmax = exp.div_(sum_exp[..., None])
        ctx.save_for_backward(softmax, local_target, outside)
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        softmax, local_target, outside = ctx.saved_tensors
        grad = softmax.clone()
        inside = (~outside).to(grad.dtype)
        grad.scatter_add_(-1, local_target[..., None], -inside[..., None])
        return (grad * grad_loss[..., None]).to(ctx.input_dtype), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                                 group: dist.ProcessGroup) -> torch.Tensor:
    """`[s, b, V/tp]` local logits, `[b, s]` labels -> unmasked per-token loss `[b, s]` (fp32).

    Equal on every TP rank; its gradient reaches each rank's own logits only.
    """
    start, _ = vocab_range(logits.shape[-1], group)
    loss = _VocabParallelCrossEntropy.apply(logits, labels.transpose(0, 1), start, group)
    return loss.transpose(0, 1)


@torch.no_grad()
def vocab_parallel_argmax(logits: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Global argmax ids `[s, b]` of `[s, b, V/tp]` local logits (ties: the lowest id).

    Each rank offers its local maximum; among the ranks holding the global maximum the lowest
    id wins, which is what `torch.argmax` over the full row returns.
    """
    local_max, local_arg = logits.max(dim=-1)
    start, _ = vocab_range(logits.shape[-1], group)
    global_max = all_reduce(local_max, group, dist.ReduceOp.MAX)
    no_candidate = torch.iinfo(torch.int64).max
    candidate = torch.where(local_max == global_max, local_arg + start,
                            torch.full_like(local_arg, no_candidate))
    return all_reduce(candidate, group, dist.ReduceOp.MIN)


class VocabParallelOutputHead:
    """The model's output head (`GPTModel.output_head`) over vocab-sharded output weights.

    Same interface as `mtp_cli.models.output.OutputHead`; `weight` is this rank's `[V/tp, h]`.
    Hidden states come in replicated or, with sequence parallel, split along the sequence (they
    are all-gathered here, once per head call). `comm` is what the chunked head reduces with.
    """

    comm = DIST_COMM

    def __init__(self, group: dist.ProcessGroup, sequence_parallel: bool = False) -> None:
        self.group, self.sequence_parallel = group, sequence_parallel

    def local_sequence_length(self, seq_len: int) -> int:
        return seq_len // group_size(self.group) if self.sequence_parallel else seq_len

    def head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[s(/tp), b, h]` -> the full `[s, b, h]`, its gradient summed over the ranks."""
        if self.sequence_parallel:
            return gather_from_sequence_parallel_region(hidden, self.group)
        return copy_to_tensor_parallel_region(hidden, self.group)

    def local_logits(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """`[s(/tp), b, h]` -> this rank's `[s, b, V/tp]`."""
        return F.linear(self.head_input(hidden), weight)

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Full `[s, b, V]` logits (gathered: the no-label path only)."""
        return gather_last_dim(self.local_logits(hidden, weight), self.group)

    def per_token_loss(self, hidden: torch.Tensor, labels: torch.Tensor,
                       weight: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(self.local_logits(hidden, weight), labels, self.group)

    def loss_and_hits_from_logits(self, logits: torch.Tensor, labels: torch.Tensor,
                                  mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`token_loss_and_hits` from this rank's `local_logits` (`mtp.distill` reuses them)."""
        predicted = vocab_parallel_argmax(logits, self.group).transpose(0, 1)  # [b, s]
        hits = ((predicted == labels) & (mask > 0)).sum()
        return vocab_parallel_cross_entropy(logits, labels, self.group), hits

    def token_loss_and_hits(self, hidden: torch.Tensor, labels: torch.Tensor,
                            mask: torch.Tensor, *, weight: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.local_logits(hidden, weight)
        predicted = vocab_parallel_argmax(logits, self.group).transpose(0, 1)  # [b, s]
        hits = ((predicted == labels) & (mask > 0)).sum()
        return vocab_parallel_cross_entropy(logits, labels, self.group), hits
