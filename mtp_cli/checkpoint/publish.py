"""The staged publish: write under a temporary name, fsync, rename into place.

A reader (a resume, `inspect-ckpt`, the user's shell) sees a file or directory whole or not at
all: it is written as `NAME.tmp-<random>` beside its final name, flushed to disk, then renamed
with `os.replace`, which is atomic within one filesystem; the directory holding it is fsynced so
the rename itself survives a crash. A name holding `TEMP_MARKER` was never published, so a
later run may delete it (`RunDir.remove_stale_temporaries`).

Used by `mtp train` (each checkpoint directory, `meta.json`, `latest`, metrics), `mtp import`
(the run directory it writes) and `mtp export` (the Hugging Face directory).
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from types import TracebackType

from mtp_cli.checkpoint.layout import TEMP_MARKER


def fsync_directory(path: Path) -> None:
    """Make a rename or a new file in directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_sibling(final: Path, tag: str = "") -> Path:
    """A fresh unpublished name beside `final`: `NAME.tmp-<tag><random>`."""
    return final.with_name(f"{final.name}{TEMP_MARKER}{tag}{secrets.token_hex(4)}")


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, fsync it, then `os.replace` it in."""
    tmp = path.with_name(f"{path.name}{TEMP_MARKER}{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def publish_directory(temp: Path, final: Path) -> None:
    """Rename the finished directory `temp` to `final`, durably.

    An existing `final` (the same checkpoint step written again, an `--overwrite`n output) is
    renamed aside first and deleted only once the new one is in place, so `final` never names
    a half-written directory.
    """
    fsync_directory(temp)
    old = None
    if os.path.lexists(final):
        old = temp_sibling(final, "old-")
        os.replace(final, old)
    try:
        os.replace(temp, final)
    except OSError:
        if old is not None:  # the previous directory back under its name, then the error
            os.replace(old, final)
        raise
    fsync_directory(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class StagedDirectory:
    """`with StagedDirectory(final) as temp:` write into `temp`; on a clean exit it becomes
    `final` (`publish_directory`), on an exception (or Ctrl-C) it is deleted."""

    def __init__(self, final: Path) -> None:
        self.final = Path(final)
        self.temp = temp_sibling(self.final)

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.temp.mkdir()
        return self.temp

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if kind is not None:
            shutil.rmtree(self.temp, ignore_errors=True)
            return
        self.publish()

    def publish(self) -> None:
        publish_directory(self.temp, self.final)
