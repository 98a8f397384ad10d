"""Write Megatron's indexed dataset (`.bin` + `.idx`, version 1: layout in `indexed.py`).

Small corpora for tests and examples; each file is written to a temporary name and renamed, so
an interrupted write leaves no pair that looks complete.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import torch

from mtp_cli.data.indexed import _HEADER, _STRUCT_CHARS, DTYPE_CODES, INDEX_MAGIC, INDEX_VERSION


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
