"""Token streams and the fixed-length windows that training samples are cut from.

Documents are concatenated, each followed by the end-of-document id (EOD): `d0 EOD d1 EOD ...`.
Sample i is the window `stream[i*s : i*s + s + 1]` of `s + 1 = seq_length + 1` tokens (windows
overlap by one token, as in Megatron's GPTDataset): its inputs are `w[:-1]`, its labels `w[1:]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # mapped.py imports indexed.py, which imports this module
    from mtp_cli.data.mapped import MappedStream


def storage_dtype(largest: int) -> torch.dtype:
    """The smallest signed integer type holding ids up to `largest` in magnitude (int16 halves
    the memory of byte corpora; out-of-range ids must survive to be reported, not wrap)."""
    for dtype in (torch.int16, torch.int32):
        if largest < torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def ranges_index(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """`cat([arange(a, a + n) for a, n in zip(starts, lengths)])`, vectorised.

    Four ops whatever the number of ranges (the sequences of an indexed dataset can number
    millions).
    """
    lengths = lengths.to(torch.int64)
    total = int(lengths.sum())
    offset = starts.to(torch.int64) - (lengths.cumsum(0) - lengths)
    return torch.arange(total) + torch.repeat_interleave(offset, lengths, output_size=total)


@dataclass
class TokenStream:
    """Documents back to back, each followed by EOD; `offsets[d]:offsets[d+1]` is document d."""

    tokens: torch.Tensor  # [n] int16/int32
    offsets: torch.Tensor  # [documents + 1] int64
    eod: int

    @classmethod
    def from_documents(cls, tokens: torch.Tensor, lengths: torch.Tensor, eod: int
                       ) -> TokenStream:
        """Concatenate documents (`tokens` back to back, `lengths` each) with EOD after each.

        Empty documents are dropped; a document that already ends with EOD (e.g. a Megatron
        dataset preprocessed with `--append-eod`) gets no second one.
        """
        lengths = lengths.to(torch.int64)
        lengths = lengths[lengths > 0]
        ends = lengths.cumsum(0)
        has_eod = (tokens[ends - 1] == eod).tolist() if len(ends) else []
        largest = max(int(tokens.abs().max()) if len(tokens) else 0, eod)
        dtype = storage_dtype(largest)
        separator = torch.tensor([eod], dtype=dtype)
        pieces: list[torch.Tensor] = []
        # One cat of views: cheap whatever the machine's load (a gather over every position,
        # or copying document by document, costs seconds on a busy 2-core machine).
        for document, ends_with_eod in zip(tokens.to(dtype).split(lengths.tolist()), has_eod,
                                           strict=True):
            pieces += [document] if ends_with_eod else [document, separator]
        stream = torch.cat(pieces) if pieces else torch.zeros(0, dtype=dtype)
        new_lengths = lengths + 1 - torch.tensor(has_eod, dtype=torch.int64)
        return cls(stream, torch.cat([torch.zeros(1, dtype=torch.int64),
                                      new_lengths.cumsum(0)]), eod)

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    def __len__(self) -> int:
        return len(self.tokens)

    def subset(self, documents: torch.Tensor) -> TokenStream:
        """The stream of the given documents (ascending indices), in their order."""
        lengths = self.offsets[1:] - self.offsets[:-1]
        pieces = self.tokens.split(lengths.tolist())
        chosen = [pieces[d] for d in documents.tolist()]
        tokens = torch.cat(chosen) if chosen else self.tokens[:0]
        return TokenStream(tokens, torch.cat([torch.zeros(1, dtype=torch.int64),
                                              lengths[documents].cumsum(0)]), self.eod)

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Positions `[start, stop)` as int64."""
        return self.tokens[start:stop].to(torch.int64)

    def slice(self, start: int, stop: int) -> TokenStream:
        """Tokens `[start, stop)` as a stream (documents cut at the edges stay cut)."""
        inner = self.offsets[(self.offsets > start) & (self.offsets < stop)] - start
        offsets = torch.cat([torch.tensor([0]), inner, torch.tensor([stop - start])])
        return TokenStream(self.tokens[start:stop], offsets, self.eod)


class TokenWindows:
    """Samples of `seq_length + 1` tokens over a token stream (a map-style dataset)."""

    def __init__(self, stream: TokenStream | MappedStream, seq_length: int) -> None:
        self.stream = stream
        self.seq_length = seq_length
        self.eod = stream.eod

    def __len__(self) -> int:
        return max(len(self.stream) - 1, 0) // self.seq_length

    @property
    def num_tokens(self) -> int:
        return len(self.stream)

    @property
    def num_documents(self) -> int:
        return self.stream.num_documents

    def __getitem__(self, index: int) -> torch.Tensor:
        """Window `index`: `[seq_length + 1]` int64 tokens."""
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range for {len(self)} windows")
        start = index * self.seq_length
        return self.stream.read(start, start + self.seq_length + 1)

    def windows(self, indices: list[int]) -> torch.Tensor:
        """`[len(indices), seq_length + 1]` int64."""
        return torch.stack([self[i] for i in indices])
