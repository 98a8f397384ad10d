"""Token streams and the fixed-length windows that training samples are cut from.

Documents are concatenated, each followed by the end-of-document id (EOD): `d0 EOD d1 EOD ...`.
Sample i is the window `stream[i*s : i*s + s + 1]` of `s + 1 = seq_length + 1` tokens (windows
overlap by one token, as in Megatron's GPTDataset): its inputs are `w[:-1]`, its labels `w[1:]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def storage_dtype(max_id: int) -> torch.dtype:
    """The smallest signed integer type that holds every id (halves memory for byte corpora)."""
    return torch.int16 if max_id < 2**15 else torch.int32


def ranges_index(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """`cat([arange(a, a + n) for a, n in zip(starts, lengths)])`, vectorised.

    Copying many slices one by one costs a thread hand-off per slice (seconds for a corpus of a
    few hundred files on a busy 2-core machine); this is four ops.
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
        has_eod = tokens[ends - 1] == eod if len(ends) else torch.zeros(0, dtype=torch.bool)
        added = (~has_eod).to(torch.int64)
        new_ends = ends + added.cumsum(0)  # each document's end, its EOD included
        max_id = max(int(tokens.max()) if len(tokens) else 0, eod)
        dtype = storage_dtype(max_id)
        # One gather, never a loop over documents: stream position p reads token
        # p - (EODs added before its document), or the EOD slot appended after the tokens.
        total = int(new_ends[-1]) if len(new_ends) else 0
        added_before = added.cumsum(0) - added
        source = torch.arange(total) - torch.repeat_interleave(
            added_before, lengths + added, output_size=total)
        source[(new_ends - 1)[~has_eod]] = len(tokens)
        padded = torch.cat([tokens.to(dtype), torch.tensor([eod], dtype=dtype)])
        stream = padded.index_select(0, source)
        return cls(stream, torch.cat([torch.zeros(1, dtype=torch.int64), new_ends]), eod)

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    def __len__(self) -> int:
        return len(self.tokens)

    def subset(self, documents: torch.Tensor) -> TokenStream:
        """The stream of the given documents (ascending indices), in their order."""
        starts = self.offsets[documents]
        lengths = self.offsets[documents + 1] - starts
        tokens = self.tokens.index_select(0, ranges_index(starts, lengths))
        return TokenStream(tokens, torch.cat([torch.zeros(1, dtype=torch.int64),
                                              lengths.cumsum(0)]), self.eod)

    def slice(self, start: int, stop: int) -> TokenStream:
        """Tokens `[start, stop)` as a stream (documents cut at the edges stay cut)."""
        inner = self.offsets[(self.offsets > start) & (self.offsets < stop)] - start
        offsets = torch.cat([torch.tensor([0]), inner, torch.tensor([stop - start])])
        return TokenStream(self.tokens[start:stop], offsets, self.eod)


class TokenWindows:
    """Samples of `seq_length + 1` tokens over a token stream (a map-style dataset)."""

    def __init__(self, stream: TokenStream, seq_length: int) -> None:
        self.stream = stream
        self.seq_length = seq_length
        self.eod = stream.eod

    def __len__(self) -> int:
        return max(len(self.stream) - 1, 0) // self.seq_length

    @property
    def num_tokens(self) -> int:
        return len(self.stream)

    def __getitem__(self, index: int) -> torch.Tensor:
        """Window `index`: `[seq_length + 1]` int64 tokens."""
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range for {len(self)} windows")
        start = index * self.seq_length
        return self.stream.tokens[start:start + self.seq_length + 1].to(torch.int64)

    def windows(self, indices: list[int]) -> torch.Tensor:
        """`[len(indices), seq_length + 1]` int64."""
        return torch.stack([self[i] for i in indices])
