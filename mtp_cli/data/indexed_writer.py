"""Write Megatron's indexed dataset (`.bin` + `.idx`) one document at a time, in bounded memory.

The format is Megatron-Core's (`megatron/core/datasets/indexed_dataset.py`, version 1; see
`indexed.py` for the layout): one sequence per document, so the document index is
`[0, 1, ..., N]`. Megatron's `IndexedDatasetBuilder` keeps every length in a Python list until
`finalize`; here the lengths go to a side file as they come, and `finalize` streams them into
the `.idx` (lengths, then pointers as their running sum, then the document index), so a corpus
of billions of documents needs no more memory than one of a hundred.

Nothing looks complete before `finalize` returns: data goes to `PREFIX.bin.tmp-<pid>` and
`PREFIX.idx.tmp-<pid>`; `finalize` removes any old `PREFIX.idx` first, renames the `.bin`, then
the `.idx` last. A killed writer leaves temporary files (or a `.bin` without its `.idx`), never a
pair that a reader would accept; `abort` removes what it wrote.
"""

from __future__ import annotations

import os
import struct
import sys
from array import array
from collections.abc import Sequence
from itertools import accumulate
from pathlib import Path

import torch

from mtp_cli.data.indexed import DTYPE_CODES, INDEX_MAGIC, INDEX_VERSION

# array typecodes of the integer token dtypes (sizes fixed on every platform torch supports)
ARRAY_CODES: dict[torch.dtype, str] = {
    torch.uint8: "B", torch.int8: "b", torch.int16: "h", torch.uint16: "H", torch.int32: "i",
    torch.int64: "q",
}
_BLOCK = 1 << 16  # index entries streamed per block in `finalize`


def optimal_dtype(vocab_size: int) -> torch.dtype:
    """Megatron's `DType.optimal_dtype`: uint16 below 65,500 ids, int32 otherwise."""
    return torch.uint16 if vocab_size < 65500 else torch.int32


def token_bytes(tokens: Sequence[int] | bytes | torch.Tensor, dtype: torch.dtype) -> bytes:
    """`tokens` as little-endian `dtype` bytes (what the `.bin` holds)."""
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.tolist()
    values = array(ARRAY_CODES[dtype], tokens)
    if sys.byteorder != "little":
        values.byteswap()
    return values.tobytes()


def _little(code: str, values: Sequence[int]) -> bytes:
    block = array(code, values)
    if sys.byteorder != "little":
        block.byteswap()
    return block.tobytes()


class IndexedDatasetWriter:
    """A streaming `.bin`/`.idx` builder: `add_document(tokens)` per document, then `finalize()`.

    `add_encoded(data, count)` takes a document already in `.bin` bytes (workers encode in
    parallel; the writer only appends)."""

    def __init__(self, prefix: str | Path, dtype: torch.dtype = torch.int32) -> None:
        if dtype not in ARRAY_CODES or dtype not in DTYPE_CODES.values():
            raise ValueError(f"{dtype} is not an integer token dtype of the .idx format")
        self.prefix = Path(prefix)
        self.dtype = dtype
        self.itemsize = torch.empty(0, dtype=dtype).element_size()
        self.bin_path = self.prefix.with_name(self.prefix.name + ".bin")
        self.idx_path = self.prefix.with_name(self.prefix.name + ".idx")
        tag = f".tmp-{os.getpid()}"
        self._bin_tmp = self.bin_path.with_name(self.bin_path.name + tag)
        self._idx_tmp = self.idx_path.with_name(self.idx_path.name + tag)
        self._lengths_tmp = self.idx_path.with_name(self.idx_path.name + tag + "-lengths")
        self._bin = open(self._bin_tmp, "wb")  # noqa: SIM115 (closed in finalize / abort)
        self._lengths = open(self._lengths_tmp, "wb")  # noqa: SIM115
        self._pending: array = array("i")
        self.documents = 0
        self.tokens = 0

    def add_document(self, tokens: Sequence[int] | torch.Tensor) -> None:
        """Append one document (token ids that fit the dtype)."""
        data = token_bytes(tokens, self.dtype)
        self.add_encoded(data, len(data) // self.itemsize)

    def add_encoded(self, data: bytes, count: int) -> None:
        """Append one document given as `count` tokens already in `.bin` bytes."""
        if count >= 1 << 31:
            raise ValueError(f"a document of {count:,} tokens does not fit the index's int32")
        self._bin.write(data)
        self._pending.append(count)
        self.documents += 1
        self.tokens += count
        if len(self._pending) >= _BLOCK:
            self._flush_lengths()

    def _flush_lengths(self) -> None:
        if sys.byteorder != "little":
            self._pending.byteswap()
        self._lengths.write(self._pending.tobytes())
        self._pending = array("i")

    def finalize(self) -> None:
        """Write the `.idx`, then publish `.bin` and `.idx` (in that order) under their names."""
        self._flush_lengths()
        self._lengths.close()
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        self._write_index()
        self.idx_path.unlink(missing_ok=True)  # an old .idx never pairs with the new .bin
        os.replace(self._bin_tmp, self.bin_path)
        os.replace(self._idx_tmp, self.idx_path)
        self._lengths_tmp.unlink(missing_ok=True)

    def _write_index(self) -> None:
        count = self.documents
        code = next(c for c, d in DTYPE_CODES.items() if d == self.dtype)
        with open(self._idx_tmp, "wb") as index:
            index.write(INDEX_MAGIC + struct.pack("<Q", INDEX_VERSION) + struct.pack("<B", code))
            index.write(struct.pack("<QQ", count, count + 1))
            with open(self._lengths_tmp, "rb") as lengths:  # i32[S] sequence lengths
                while block := lengths.read(4 * _BLOCK):
                    index.write(block)
            pointer = 0  # i64[S] sequence pointers: the running sum of lengths, in bytes
            with open(self._lengths_tmp, "rb") as lengths:
                while block := lengths.read(4 * _BLOCK):
                    values = array("i", block)
                    if sys.byteorder != "little":
                        values.byteswap()
                    running = array("q", accumulate((n * self.itemsize for n in values),
                                                    initial=pointer))
                    pointer = running.pop()
                    index.write(_little("q", running))
            for start in range(0, count + 1, _BLOCK):  # i64[S+1] document index 0..S
                index.write(_little("q", range(start, min(start + _BLOCK, count + 1))))
            index.flush()
            os.fsync(index.fileno())

    def abort(self) -> None:
        """Close and remove everything written so far (the published names are untouched)."""
        for handle in (self._bin, self._lengths):
            handle.close()
        for path in (self._bin_tmp, self._idx_tmp, self._lengths_tmp):
            path.unlink(missing_ok=True)


def write_indexed_dataset(prefix: str | Path, documents: Sequence[Sequence[int] | torch.Tensor],
                          dtype: torch.dtype = torch.int32) -> None:
    """Write `documents` (one sequence each) as `prefix.bin` + `prefix.idx`, as Megatron does
    (small corpora for tests and examples; `mtp data prepare` streams through the writer)."""
    writer = IndexedDatasetWriter(prefix, dtype)
    try:
        for tokens in documents:
            writer.add_document(tokens)
    except BaseException:
        writer.abort()
        raise
    writer.finalize()
