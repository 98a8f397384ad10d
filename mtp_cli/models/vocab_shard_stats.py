"""Cross-entropy statistics of vocab-sharded logits (tensor parallel), one chunk of tokens at a time.

Under tensor parallel each rank holds rows `[start, start + V_local)` of the output weight, so it
sees only its slice of every token's logits. A rank summarises its slice per token (local
log-sum-exp, local max and the argmax's global index, the target logit if the label falls in its
slice) and one all-gather combines the summaries: the global log-sum-exp is the log-sum-exp of the
local ones, the target logit is the sum (exactly one rank holds it), and the global argmax is the
lowest index reaching the global max (`torch.argmax`'s first-occurrence rule over full logits).
Without a group every statistic is already global and nothing is communicated. The collectives go
through the shard's `ModelComm` (`mtp_cli.nn.comm`): this module stays single-device code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtp_cli.nn.comm import LOCAL_COMM, Group, ModelComm, comm_for

IGNORE_INDEX = -100  # labels equal to it get zero loss and zero gradient (F.cross_entropy's rule)


@dataclass(frozen=True)
class VocabShard:
    """This rank's rows of the output weight: `[start, start + size)` of `vocab_size`."""

    start: int
    size: int
    group: Group = None
    comm: ModelComm = LOCAL_COMM

    @classmethod
    def of(cls, local_rows: int, group: Group, comm: ModelComm | None = None) -> VocabShard:
        """Equal contiguous shards in rank order (Megatron's vocab-parallel layout)."""
        comm = comm_for(group, comm)
        if group is None or comm.size(group) == 1:
            return cls(0, local_rows, None)
        return cls(comm.rank(group) * local_rows, local_rows, group, comm)

    def local_labels(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels as row indices of this shard (clamped) and where they are really here."""
        local = labels - self.start
        here = (local >= 0) & (local < self.size)
        return local.clamp(0, self.size - 1), here


@dataclass
class ChunkStats:
    """Per-token statistics of one chunk: `lse`, `target` logit and `pred` (global argmax)."""

    lse: torch.Tensor  # [C] fp32
    target: torch.Tensor  # [C] fp32
    pred: torch.Tensor  # [C] int64


def local_stats(logits: torch.Tensor, local_labels: torch.Tensor, here: torch.Tensor,
                shard: VocabShard) -> tuple[torch.Tensor, ...]:
    """Summaries of this shard's fp32 logits `[C, V_local]`: lse, max, argmax, target.

    Works in place (no `[C, V]` temporaries): `logits` is left holding `exp(logits - max)`.
    """
    target = logits.gather(1, local_labels.unsqueeze(1)).squeeze(1) * here
    top, index = logits.max(dim=-1)
    sum_exp = logits.sub_(top.unsqueeze(1)).exp_().sum(dim=-1)
    return top + sum_exp.log(), top, index + shard.start, target


def combine_stats(lse: torch.Tensor, top: torch.Tensor, index: torch.Tensor,
                  target: torch.Tensor, shard: VocabShard) -> ChunkStats:
    """Global statistics from every shard's summaries (one all-gather under tensor parallel)."""
    if shard.group is None:
        return ChunkStats(lse, target, index)
    # float64 carries fp32 values and int indices (< 2**53) exactly, so one collective suffices.
    mine = torch.stack([lse.double(), top.double(), index.double(), target.double()])
    every = torch.stack(shard.comm.all_gather(mine, shard.group))  # [tp, 4, C]
    winner = every[:, 1].argmax(dim=0, keepdim=True)  # first max = lowest rank = lowest index
    return ChunkStats(
        lse=torch.logsumexp(every[:, 0], dim=0).float(),
        target=every[:, 3].sum(dim=0).float(),
        pred=every[:, 2].gather(0, winner).squeeze(0).long(),
    )


def all_ranks_agree(flag: bool, shard: VocabShard, device: torch.device) -> bool:
    """True only if `flag` is true on every rank (so ranks never take different code paths)."""
    if shard.group is None:
        return flag
    value = torch.tensor([1 if flag else 0], device=device)
    return bool(shard.comm.all_reduce(value, shard.group, "min").item())
