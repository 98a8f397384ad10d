"""Hostile checkpoint files for the tests: pickles that would write a marker file when
unpickled by plain `pickle`, and damage done to a checkpoint directory."""

from __future__ import annotations

import os
import pickle
from pathlib import Path


def write_marker(path: str) -> str:
    """What a hostile pickle calls: proof that code from the file ran."""
    Path(path).write_text("code from a checkpoint ran\n")
    return path


class MarkerPickle:
    """Unpickled by plain pickle, this calls `write_marker(path)`."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (write_marker, (self.path,))


def plant_marker_pickle(checkpoint: Path, marker: Path) -> None:
    """Replace `.metadata` with real DCP metadata carrying a `MarkerPickle` inside it."""
    with open(checkpoint / ".metadata", "rb") as handle:
        metadata = pickle.load(handle)  # our own test data: trusted
    metadata.planner_data = {"payload": MarkerPickle(marker)}
    (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))


def shard(checkpoint: Path) -> Path:
    return next(checkpoint.glob("*.distcp"))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def flip_byte(path: Path, offset_from_end: int = 64) -> None:
    """Flip one byte inside the tensor data near the end of `path` (length unchanged)."""
    data = bytearray(path.read_bytes())
    data[len(data) - offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def make_fifo(path: Path) -> None:
    if path.exists() or path.is_symlink():
        path.unlink()
    os.mkfifo(path)
