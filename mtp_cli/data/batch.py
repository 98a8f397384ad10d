"""`Batch`: one micro-batch, and how windows of tokens become one.

Plain batches: `input_ids = w[:, :-1]`, `labels = w[:, 1:]`, every token counts in the loss and
positions run 0..s-1; attention crosses documents (the EOD token separates them), as Megatron
does by default.

Packed batches (`data.packed`, micro-batch size 1, Megatron's THD convention): a document is a
run of input positions that ends with an EOD token (the window's last run may be cut short by
the window's end; its first may have begun before the window's start). Its boundaries go into
`PackedSeqParams.cu_seqlens_q`, positions restart at 0 in each document, and the EOD position of
each document is masked out of the loss (its label is the first token of the next document,
which nothing in the document predicts; Megatron's `eod_mask_loss`). A cut-short last document
keeps its last position in the loss: its label is the true next token of that document. The MTP
rolls then respect the boundaries, and since they roll the loss mask too, no depth's loss ever
crosses a boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from mtp_cli.nn.packed import PackedSeqParams


@dataclass
class Batch:
    """One micro-batch of CPU (or device) tensors, `[b, s]` each."""

    input_ids: torch.Tensor  # int64
    labels: torch.Tensor  # int64: labels[:, i] = next token of input_ids[:, i]
    loss_mask: torch.Tensor  # float32: 1 = counts in the loss
    position_ids: torch.Tensor  # int64; packed: restart at 0 in each document
    packed_seq_params: PackedSeqParams | None = None  # only with data.packed (then b == 1)

    def to(self, device: torch.device | str) -> Batch:
        """The batch on `device` (cu_seqlens included)."""
        params = self.packed_seq_params
        if params is not None:
            params = replace(params, **{
                name: getattr(params, name).to(device)
                for name in ("cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded",
                             "cu_seqlens_kv_padded")
                if getattr(params, name) is not None
            })
        return Batch(self.input_ids.to(device), self.labels.to(device),
                     self.loss_mask.to(device), self.position_ids.to(device), params)

    @property
    def num_tokens(self) -> int:
        """Tokens that count in the loss."""
        return int(self.loss_mask.sum().item())

    @property
    def seq_length(self) -> int:
        return self.input_ids.shape[1]


def plain_batch(windows: torch.Tensor) -> Batch:
    """`[b, s + 1]` windows -> a batch where attention and positions ignore documents."""
    batch, length = windows.shape[0], windows.shape[1] - 1
    return Batch(
        input_ids=windows[:, :-1].contiguous(),
        labels=windows[:, 1:].contiguous(),
        loss_mask=torch.ones(batch, length, dtype=torch.float32),
        position_ids=torch.arange(length).repeat(batch, 1),
    )


def ranges(starts: list[int], lengths: list[int]) -> torch.Tensor:
    """`cat([arange(a, a + n) ...])` as an int64 tensor, built in Python.

    Index sets of one sequence are short; building them with tensor ops costs a thread hand-off
    per op, which on a loaded machine is milliseconds each (measured: 10 ms per
    `repeat_interleave` on 2 busy cores), far more than these few list operations.
    """
    index: list[int] = []
    for start, length in zip(starts, lengths, strict=True):
        index.extend(range(start, start + length))
    return torch.tensor(index, dtype=torch.int64)


def document_lengths(input_ids: torch.Tensor, eod: int) -> list[int]:
    """Lengths of the runs of `input_ids` (1-D) that end with EOD (the last may not)."""
    ends = (torch.nonzero(input_ids == eod).flatten() + 1).tolist()
    if not ends or ends[-1] != len(input_ids):
        ends.append(len(input_ids))
    return [b - a for a, b in zip([0, *ends[:-1]], ends, strict=True)]


def packed_batch(window: torch.Tensor, eod: int) -> Batch:
    """One `[s + 1]` window -> a packed batch of size 1 (see the module docstring)."""
    input_ids, labels = window[:-1], window[1:]
    lengths = document_lengths(input_ids, eod)
    return Batch(
        input_ids=input_ids.unsqueeze(0).contiguous(),
        labels=labels.unsqueeze(0).contiguous(),
        loss_mask=(input_ids != eod).to(torch.float32).unsqueeze(0),
        position_ids=ranges([0] * len(lengths), lengths).unsqueeze(0),
        packed_seq_params=PackedSeqParams.from_lengths(lengths),
    )
