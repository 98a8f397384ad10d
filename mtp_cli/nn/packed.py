"""Packed sequences in Megatron's THD convention."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedSeqParams:
    """Document boundaries of a packed micro-batch (Megatron-Core's fields).

    Documents are concatenated along the sequence of a micro-batch of size 1; `cu_seqlens_q`
    holds the cumulative lengths `[0, len_0, len_0 + len_1, ...]`. When documents are padded
    (context parallel needs every length to divide by 2 x cp), `cu_seqlens_q_padded` holds the
    padded boundaries, which are the ones that locate documents in the sequence.
    """

    qkv_format: str = "thd"
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_kv: torch.Tensor | None = None
    cu_seqlens_q_padded: torch.Tensor | None = None
    cu_seqlens_kv_padded: torch.Tensor | None = None
    max_seqlen_q: int | None = None
    max_seqlen_kv: int | None = None

    def __post_init__(self) -> None:
        if self.qkv_format != "thd":
            raise ValueError(f"only qkv_format='thd' is supported, got {self.qkv_format!r}")
        if self.cu_seqlens_q is None:
            raise ValueError("PackedSeqParams needs cu_seqlens_q")
        if self.cu_seqlens_kv is None:
            self.cu_seqlens_kv = self.cu_seqlens_q
        if self.cu_seqlens_kv_padded is None:
            self.cu_seqlens_kv_padded = self.cu_seqlens_q_padded

    def attention_boundaries(self) -> torch.Tensor:
        """Where documents start and end in the (possibly padded) sequence."""
        if self.cu_seqlens_q_padded is not None:
            return self.cu_seqlens_q_padded
        return self.cu_seqlens_q

    @classmethod
    def from_lengths(cls, lengths: list[int], padded_lengths: list[int] | None = None
                     ) -> PackedSeqParams:
        """Boundaries from document lengths (and their padded lengths, if padded)."""

        def cumulative(values: list[int]) -> torch.Tensor:
            return torch.tensor([0, *torch.tensor(values).cumsum(0).tolist()], dtype=torch.int32)

        cu = cumulative(lengths)
        cu_padded = cumulative(padded_lengths) if padded_lengths is not None else None
        return cls(
            cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_padded,
            cu_seqlens_kv_padded=cu_padded, max_seqlen_q=max(lengths, default=0),
            max_seqlen_kv=max(lengths, default=0),
        )
