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
was preprocessed with sentence splitting). Read without numpy, into memory (the data pipeline
concatenates whole documents anyway).
"""

from __future__ import annotations

import os
import struct
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


def read_indexed_dataset(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """`(tokens, document_lengths)`: every document's tokens back to back (int64), and lengths."""
    prefix = indexed_prefix(path) or Path(path)
    idx_path, bin_path = prefix.with_name(prefix.name + ".idx"), prefix.with_name(
        prefix.name + ".bin")
    for needed in (idx_path, bin_path):
        if not needed.is_file():
            raise UserError(problems=[Problem("missing (an indexed dataset needs .bin and .idx)",
                                              file=str(needed))])
    dtype, lengths, pointers, documents = _read_index(idx_path)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    data = bytearray(read_file_bytes(bin_path))
    _check_against_bin(idx_path, bin_path, len(data), itemsize, lengths, pointers)
    everything = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
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


def write_indexed_dataset(prefix: str | Path, documents: list[list[int]] | list[torch.Tensor],
                          dtype: torch.dtype = torch.int32) -> None:
    """Write documents (one sequence each) as `prefix.bin` + `prefix.idx`, as Megatron does."""
    code = next(c for c, d in DTYPE_CODES.items() if d == dtype)
    prefix = Path(prefix)
    tensors = [torch.as_tensor(doc, dtype=torch.int64).to(dtype) for doc in documents]
    lengths = [len(t) for t in tensors]
    itemsize = torch.empty(0, dtype=dtype).element_size()
    pointers = torch.tensor([0, *lengths[:-1]], dtype=torch.int64).cumsum(0) * itemsize
    char = _STRUCT_CHARS[dtype]
    data = b"".join(struct.pack(f"<{len(t)}{char}", *t.tolist()) for t in tensors)
    index = b"".join([
        _HEADER.pack(INDEX_MAGIC, INDEX_VERSION, code, len(lengths), len(lengths) + 1),
        struct.pack(f"<{len(lengths)}i", *lengths),
        struct.pack(f"<{len(lengths)}q", *pointers.tolist()[:len(lengths)]),
        struct.pack(f"<{len(lengths) + 1}q", *range(len(lengths) + 1)),
    ])
    for suffix, payload in ((".bin", data), (".idx", index)):
        target = prefix.with_name(prefix.name + suffix)
        temporary = target.with_name(target.name + ".tmp")
        temporary.write_bytes(payload)
        os.replace(temporary, target)
