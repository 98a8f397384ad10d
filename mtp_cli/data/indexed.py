"""Megatron's indexed dataset (`.bin` + `.idx`, MMapIndexedDataset version 1), read and written.

Megatron users already have their corpora in this format (`tools/preprocess_data.py`). The
index file is, all little-endian:

    b"MMIDIDX\\x00\\x00"   9-byte magic
    u64 version = 1
    u8  dtype code        1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32,
                          8 uint16
    u64 sequence count S
    u64 document count D  (entries of the document index: number of documents + 1)
    i32[S] sequence lengths (tokens)
    i64[S] sequence pointers (byte offsets into .bin)
    i64[D] document index: [0, end_0, end_1, ...], sequence ids where each document ends
    (i8[S] sequence modes: multimodal datasets only; ignored here)

A document is the concatenation of its sequences (one sequence per document unless the corpus
was preprocessed with sentence splitting). The `.idx` is read and checked whole (it is small:
20 bytes a document); the `.bin` is memory-mapped, never read: tokens stay in their stored dtype
in the page cache, shared by every rank of a machine, and a sample widens only its own window
(`mapped.MappedStream`). Without numpy: `mmap` and `torch.frombuffer` are enough.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from mtp_cli.data.documents import read_file_bytes
from mtp_cli.data.windows import ranges_index
from mtp_cli.errors import Problem, UserError

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
DTYPE_CODES: dict[int, torch.dtype] = {
    1: torch.uint8, 2: torch.int8, 3: torch.int16, 4: torch.int32, 5: torch.int64,
    6: torch.float64, 7: torch.float32, 8: torch.uint16,
}
_HEADER = struct.Struct("<9sQBQQ")
_STRUCT_CHARS = {torch.uint8: "B", torch.int8: "b", torch.int16: "h", torch.int32: "i",
                 torch.int64: "q", torch.uint16: "H"}


def indexed_prefix(path: str | Path) -> Path | None:
    """The `.bin`/`.idx` prefix that `path` names (the prefix or either file), if it is one."""
    path = Path(path)
    if path.suffix in (".bin", ".idx"):
        return path.with_suffix("")
    if path.with_name(path.name + ".idx").exists():
        return path
    return None


def _bad_index(idx_path: Path, message: str) -> UserError:
    return UserError(problems=[Problem(f"not a Megatron indexed dataset index: {message}",
                                       file=str(idx_path))])


def _read_index(idx_path: Path) -> tuple[torch.dtype, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token dtype, sequence lengths, sequence pointers, document index) of an .idx file."""
    raw = read_file_bytes(idx_path)
    if len(raw) < _HEADER.size:
        raise _bad_index(idx_path, f"{len(raw)} bytes is shorter than the header")
    magic, version, code, num_sequences, num_doc_entries = _HEADER.unpack_from(raw)
    if magic != INDEX_MAGIC:
        raise _bad_index(idx_path, f"bad header {magic!r} (expected {INDEX_MAGIC!r})")
    if version != INDEX_VERSION:
        raise _bad_index(idx_path, f"version {version} (only version {INDEX_VERSION} is known)")
    if code not in DTYPE_CODES or DTYPE_CODES[code].is_floating_point:
        raise _bad_index(idx_path, f"dtype code {code} is not an integer token type")
    needed = _HEADER.size + 12 * num_sequences + 8 * num_doc_entries
    if len(raw) < needed:
        raise _bad_index(idx_path, f"truncated: {len(raw)} bytes, the header promises {needed}")
    buffer = bytearray(raw[_HEADER.size:needed])
    lengths = torch.frombuffer(buffer, dtype=torch.int32, count=num_sequences).to(torch.int64)
    offset = 4 * num_sequences
    pointers = torch.frombuffer(buffer, dtype=torch.int64, count=num_sequences, offset=offset)
    documents = torch.frombuffer(buffer, dtype=torch.int64, count=num_doc_entries,
                                 offset=offset + 8 * num_sequences)
    if num_doc_entries == 0 or documents[0] != 0 or documents[-1] != num_sequences or bool(
            (documents[1:] < documents[:-1]).any()):
        raise _bad_index(idx_path, "the document index is not [0, ..., sequence count] ascending")
    if bool((lengths < 0).any()) or bool((pointers < 0).any()):
        raise _bad_index(idx_path, "negative sequence length or pointer")
    return DTYPE_CODES[code], lengths, pointers.clone(), documents.clone()


def _check_against_bin(idx_path: Path, bin_path: Path, size: int, itemsize: int,
                       lengths: torch.Tensor, pointers: torch.Tensor) -> None:
    """Every sequence lies inside the .bin, and together they are no larger than it.

    Pointers are compared with the file size before any sum (a pointer near 2^63 plus a length
    would wrap around in int64), and the sequences may not add up to more tokens than the file
    holds, so that gathering them can never allocate more than the file's size.
    """
    if not len(lengths):
        return
    far = int(pointers.max())
    if far > size:
        raise _bad_index(idx_path, f"a sequence pointer ({far:,}) lies past the end of "
                                   f"{bin_path.name} ({size:,} bytes)")
    if int(lengths.max()) * itemsize > size:
        raise _bad_index(idx_path, f"a sequence length ({int(lengths.max()):,} tokens) is longer "
                                   f"than all of {bin_path.name} ({size:,} bytes)")
    ends = pointers + lengths * itemsize  # each term <= size: no overflow
    if int(ends.max()) > size:
        raise UserError(problems=[Problem(
            f"{size:,} bytes, but the index points up to byte {int(ends.max()):,}",
            file=str(bin_path))])
    if bool((pointers % itemsize != 0).any()):
        raise _bad_index(idx_path, f"a sequence pointer is not a multiple of {itemsize} bytes")
    total = int(lengths.sum()) * itemsize
    if total > size:
        raise _bad_index(idx_path, f"its sequences add up to {total:,} bytes, more than "
                                   f"{bin_path.name} holds ({size:,}): they overlap")


def indexed_files(path: str | Path) -> tuple[Path, Path]:
    """`(prefix.idx, prefix.bin)` of the dataset `path` names; both must be regular files."""
    prefix = indexed_prefix(path) or Path(path)
    idx_path, bin_path = prefix.with_name(prefix.name + ".idx"), prefix.with_name(
        prefix.name + ".bin")
    for needed in (idx_path, bin_path):
        if not needed.is_file():
            raise UserError(problems=[Problem("missing (an indexed dataset needs .bin and .idx)",
                                              file=str(needed))])
    return idx_path, bin_path


def map_tokens(bin_path: Path, dtype: torch.dtype) -> torch.Tensor:
    """Every token of `bin_path` as a 1-D tensor over a private read-only-in-practice memory
    map (copy-on-write, so the tensor is writable for torch yet never writes the file); pages
    are read when a window touches them and stay shared in the page cache."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    try:
        with open(bin_path, "rb") as handle:
            size = handle.seek(0, 2)
            if size < itemsize:
                return torch.empty(0, dtype=dtype)
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    except OSError as exc:
        raise UserError(problems=[Problem(f"cannot map: {exc.strerror or exc}",
                                          file=str(bin_path))]) from exc
    return torch.frombuffer(mapped, dtype=dtype, count=size // itemsize)


@dataclass
class IndexedDocuments:
    """An indexed dataset's documents as ranges of its memory-mapped tokens."""

    tokens: torch.Tensor  # [tokens in .bin], the stored dtype, memory-mapped
    starts: torch.Tensor  # [documents] int64: where each document starts in `tokens`
    lengths: torch.Tensor  # [documents] int64
    bin_path: Path

    def scan(self, chunk: int = 1 << 23) -> tuple[int, int, torch.Tensor]:
        """(smallest id, largest id, [documents] int64 last token of each non-empty document,
        -1 for empty ones) over the span the documents cover.

        Read with plain reads in bounded chunks, not through the map: pages touched through a
        map count in this process's RSS until reclaimed, read() pages only in the page cache.
        """
        dtype = self.tokens.dtype
        itemsize = self.tokens.element_size()
        ends = self.starts + self.lengths  # exclusive, in tokens
        last = torch.full_like(self.starts, -1)
        nonempty = self.lengths > 0
        if not bool(nonempty.any()):
            return 0, 0, last
        first, stop = int(self.starts[nonempty].min()), int(ends[nonempty].max())
        low, high = None, None
        with open(self.bin_path, "rb") as handle:
            for begin in range(first, stop, chunk):
                handle.seek(begin * itemsize)
                raw = bytearray(handle.read(min(chunk, stop - begin) * itemsize))
                piece = torch.frombuffer(raw, dtype=dtype).to(torch.int64)
                low = int(piece.min()) if low is None else min(low, int(piece.min()))
                high = int(piece.max()) if high is None else max(high, int(piece.max()))
                inside = nonempty & (ends > begin) & (ends <= begin + len(piece))
                last[inside] = piece[ends[inside] - 1 - begin]
        return int(low or 0), int(high or 0), last


def open_indexed_dataset(path: str | Path) -> IndexedDocuments | None:
    """The dataset's documents over a memory map of its `.bin`, the index checked against the
    file first; None when a document's sequences are not stored back to back (hand-made
    files; `read_indexed_dataset` gathers those into memory)."""
    idx_path, bin_path = indexed_files(path)
    dtype, lengths, pointers, documents = _read_index(idx_path)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    _check_against_bin(idx_path, bin_path, bin_path.stat().st_size, itemsize, lengths, pointers)
    starts = pointers // itemsize
    first, last = documents[:-1], documents[1:]
    inside = torch.ones(len(starts), dtype=torch.bool)  # sequence i continues sequence i - 1
    inside[documents[documents < len(starts)]] = False
    if bool((starts[1:] != starts[:-1] + lengths[:-1])[inside[1:]].any()):
        return None
    per_sequence = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    doc_starts = torch.cat([starts, torch.zeros(1, dtype=torch.int64)])[first]
    return IndexedDocuments(map_tokens(bin_path, dtype), doc_starts,
                            per_sequence[last] - per_sequence[first], bin_path)


def read_indexed_dataset(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """`(tokens, document_lengths)`: every document's tokens back to back (int64), and lengths,
    in memory (tests and hand-made files; training maps the file: `open_indexed_dataset`)."""
    idx_path, bin_path = indexed_files(path)
    dtype, lengths, pointers, documents = _read_index(idx_path)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    _check_against_bin(idx_path, bin_path, bin_path.stat().st_size, itemsize, lengths, pointers)
    everything = map_tokens(bin_path, dtype)
    if dtype == torch.uint16:  # few ops support uint16; int32 holds every value
        everything = everything.to(torch.int32)
    starts = pointers // itemsize
    if len(starts) and bool((starts[1:] == starts[:-1] + lengths[:-1]).all()):
        tokens = everything[int(starts[0]):int(starts[0]) + int(lengths.sum())]  # as written
    else:
        tokens = everything.index_select(0, ranges_index(starts, lengths))
    per_sequence = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    document_lengths = per_sequence[documents[1:]] - per_sequence[documents[:-1]]
    return tokens.to(torch.int64), document_lengths
