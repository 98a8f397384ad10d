"""Shared helpers of the data tests: tiny specs and hand-made corpora."""

from __future__ import annotations

import struct
from pathlib import Path

from mtp_cli.config.schema import RunSpec

EOD = 256


def make_spec(seq_length: int = 8, vocab_size: int = 320, micro_batch_size: int = 1,
              global_batch_size: int = 4, context: int = 1, **data: object) -> RunSpec:
    """A tiny RunSpec whose `data` section is `data` (val_fraction 0 unless given)."""
    data.setdefault("val_fraction", 0.0)
    return RunSpec.model_validate({
        "model": {"vocab_size": vocab_size, "hidden_size": 8, "num_layers": 1,
                  "num_attention_heads": 2, "seq_length": seq_length},
        "parallel": {"context": context},
        "train": {"micro_batch_size": micro_batch_size, "global_batch_size": global_batch_size},
        "data": data,
    })


def byte_stream(*documents: bytes) -> list[int]:
    """The reference token stream of byte documents: each document's bytes, then EOD."""
    stream: list[int] = []
    for doc in documents:
        if doc:
            stream += [*doc, EOD]
    return stream


def write_text_files(root: Path, files: dict[str, bytes]) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


def index_bytes(code: int, lengths: list[int], pointers: list[int], doc_index: list[int]
                 ) -> bytes:
    """An .idx written by hand from the documented layout (independent of the writer)."""
    return b"".join([
        b"MMIDIDX\x00\x00", struct.pack("<Q", 1), struct.pack("<B", code),
        struct.pack("<Q", len(lengths)), struct.pack("<Q", len(doc_index)),
        struct.pack(f"<{len(lengths)}i", *lengths), struct.pack(f"<{len(pointers)}q", *pointers),
        struct.pack(f"<{len(doc_index)}q", *doc_index),
    ])
