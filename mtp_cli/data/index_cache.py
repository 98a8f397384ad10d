"""Sample indices built once, cached on disk, reused by every rank and every resume.

An entry is a dict of tensors (the document tables of the training and validation streams, the
corpus's id range, blending indices) saved with `torch.save` and read back with
`weights_only=True`. Its name is a SHA-256 of everything it depends on: the data files' resolved
paths, sizes and modification times (stricter than Megatron's md5 key, which leaves out size
and mtime, so a file rewritten in place is noticed), the sequence length, the split, the EOD id,
the blend's weights and this format's version. The shuffle is not cached: the loader draws it
per epoch from `train.seed` (`torch.randperm`, O(windows), as cheap as reading it back).

Where: `.mtp_index_cache/` beside the data when that directory is writable, else
`$XDG_CACHE_HOME/mtp/index` (`~/.cache/mtp/index`); `build_datasets` knows the spec, not the run
directory. Who builds: whichever process takes the entry's lock (`fcntl.flock`) first: the
launcher when it checks the data before starting workers, or the first rank of each node when
the cache is node-local; the others wait on the lock, then read. Atomic: the entry is written
to a temporary name, fsynced and renamed, so a killed build leaves only a `*.tmp` that nothing
reads; an entry that cannot be read is rebuilt.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

CACHE_VERSION = 1
CACHE_DIR_NAME = ".mtp_index_cache"
Entry = dict[str, torch.Tensor]


def file_identity(path: Path) -> list[object]:
    """What a cached index depends on in one data file: where, how big, when written."""
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def cache_key(files: list[Path], **params: object) -> str:
    """SHA-256 (hex) of the files' identities, the parameters and the format version."""
    record = {"version": CACHE_VERSION, "files": [file_identity(f) for f in files],
              "params": params}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def cache_dir_for(data_file: Path) -> Path:
    """`.mtp_index_cache/` beside `data_file` when writable, else the user's cache directory."""
    beside = data_file.resolve().parent
    if os.access(beside, os.W_OK):
        return beside / CACHE_DIR_NAME
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return home / "mtp" / "index"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _load(path: Path) -> Entry | None:
    try:
        entry = torch.load(path, weights_only=True)
    except FileNotFoundError:
        return None
    except Exception:  # a damaged entry (disk trouble, a foreign file): rebuilt, never used
        return None
    return entry if isinstance(entry, dict) else None


def _save(path: Path, entry: Entry) -> None:
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        torch.save(entry, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def cached(directory: Path, key: str, build: Callable[[], Entry]) -> tuple[Entry, bool]:
    """`(entry, built)`: the entry named `key` in `directory`, built under its lock when it is
    missing or unreadable. A cache directory that cannot be created means building in memory."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return build(), True
    path = directory / f"{key}.pt"
    try:
        with _locked(directory / f"{key}.lock"):
            entry = _load(path)
            if entry is not None:
                return entry, False
            entry = build()
            _save(path, entry)
            return entry, True
    except PermissionError:  # a cache directory someone else owns: build, keep nothing
        return build(), True
