"""`MappedStream`: the EOD-separated token stream of an indexed dataset, never materialised.

`TokenStream.from_documents` builds `d0 EOD d1 EOD ...` in memory: 8 bytes a token once widened,
on every rank. Here the same stream is a table over the memory-mapped `.bin`: document i of the
stream is `length[i]` tokens at `start[i]` of the mapped tokens, followed by one EOD when
`eod[i]` (a document that already ends with EOD gets none, as there). `offsets` (the cumulative
lengths) place every document in the stream, so window `[a, b)` is found by a binary search and
copied from the few documents it overlaps, widened to int64 then. Resident memory: the table,
24 bytes a document, whatever the number of tokens.

Same interface as `TokenStream` where the split and the windows use it (`offsets`,
`num_documents`, `subset`, `slice`, `read`), and the same tokens at every position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtp_cli.data.indexed import IndexedDocuments


@dataclass
class MappedStream:
    """Documents of a mapped token array, each followed by EOD where `eod` says."""

    tokens: torch.Tensor  # [tokens in .bin], stored dtype, memory-mapped: never copied whole
    start: torch.Tensor  # [documents] int64, in `tokens`
    length: torch.Tensor  # [documents] int64, without the EOD
    eod_after: torch.Tensor  # [documents] bool
    eod: int

    def __post_init__(self) -> None:
        sizes = self.length + self.eod_after.to(torch.int64)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])

    @classmethod
    def from_indexed(cls, documents: IndexedDocuments, eod: int
                     ) -> tuple[MappedStream, tuple[int, int]]:
        """The stream (empty documents dropped; EOD after each that does not already end with
        it) and its id range, EOD included: one bounded pass over the file."""
        low, high, last = documents.scan()
        keep = documents.lengths > 0
        stream = cls(documents.tokens, documents.starts[keep], documents.lengths[keep],
                     last[keep] != eod, eod)
        return stream, (min(low, eod), max(high, eod))

    def table(self) -> dict[str, torch.Tensor]:
        """The document table (what the index cache stores; the tokens are the file's)."""
        return {"start": self.start, "length": self.length, "eod_after": self.eod_after}

    @property
    def num_documents(self) -> int:
        return len(self.start)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def subset(self, documents: torch.Tensor) -> MappedStream:
        """The stream of the given documents (ascending indices), in their order."""
        return MappedStream(self.tokens, self.start[documents], self.length[documents],
                            self.eod_after[documents], self.eod)

    def slice(self, start: int, stop: int) -> MappedStream:
        """Stream positions `[start, stop)` (documents cut at the edges stay cut)."""
        first = int(torch.searchsorted(self.offsets, start, right=True)) - 1
        last = int(torch.searchsorted(self.offsets, stop, right=False))  # exclusive
        begin, length = self.start[first:last].clone(), self.length[first:last].clone()
        eod_after = self.eod_after[first:last].clone()
        cut_front = start - int(self.offsets[first])  # positions dropped from the first
        taken = torch.clamp(torch.tensor(cut_front), max=length[0])
        begin[0] += taken
        length[0] -= taken
        if cut_front > int(taken):  # the cut falls on the first document's EOD itself
            eod_after[0] = False
        overshoot = int(self.offsets[last]) - stop  # positions past `stop` in the last
        if overshoot > 0:
            if eod_after[-1]:
                eod_after[-1] = False
                overshoot -= 1
            length[-1] -= overshoot
        return MappedStream(self.tokens, begin, length, eod_after, self.eod)

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Stream positions `[start, stop)` as int64 (the one place tokens are widened)."""
        document = int(torch.searchsorted(self.offsets, start, right=True)) - 1
        pieces: list[torch.Tensor] = []
        position = start
        while position < stop:
            begin = int(self.offsets[document])
            if position >= int(self.offsets[document + 1]):
                document += 1
                continue
            inner, length = position - begin, int(self.length[document])
            if inner < length:
                end = min(length, stop - begin)
                first = int(self.start[document])
                pieces.append(self.tokens[first + inner:first + end].to(torch.int64))
                position = begin + end
            else:  # the document's EOD
                pieces.append(torch.tensor([self.eod], dtype=torch.int64))
                position += 1
        return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)
