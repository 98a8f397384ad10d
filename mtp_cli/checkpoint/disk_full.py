"""A full disk, recognised wherever it surfaces, and DCP saves that keep it recognisable.

`torch.save` on a full disk raises `RuntimeError("... unexpected pos 704 vs 598")` with the
`OSError(ENOSPC)` only as its `__context__`, and DCP pickles every rank's failure to gather it
on all ranks, which drops the context. `DiskAwareWriter` re-raises such a failure as a plain
`OSError(ENOSPC)` on the rank where it happened, so every rank can tell the user the disk is full.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch.distributed.checkpoint as dcp

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def find_disk_full(error: BaseException | None,
                   errnos: frozenset[int] = DISK_FULL_ERRNOS) -> OSError | None:
    """The `OSError` (ENOSPC/EDQUOT, or one of `errnos`) behind `error`: itself, its cause or
    context, or a rank's failure inside a DCP `CheckpointException`; None when there is none."""
    stack, seen = [error], set()
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in errnos:
            return current
        stack += [current.__cause__, current.__context__]
        failures = getattr(current, "failures", None)  # CheckpointException: rank -> (exc, tb)
        if isinstance(failures, dict):
            stack += [f[0] if isinstance(f, tuple) else f for f in failures.values()
                      if isinstance(f, (tuple, BaseException))]
    return None


@contextlib.contextmanager
def _plain_disk_full() -> Iterator[None]:
    try:
        yield
    except BaseException as error:
        full = find_disk_full(error)
        if full is None or full is error:
            raise
        raise OSError(full.errno, os.strerror(full.errno), full.filename) from None


class DiskAwareWriter(dcp.FileSystemWriter):
    """`FileSystemWriter` whose failures on a full disk are a plain `OSError(ENOSPC)`;
    `before_write` runs first on every write (a test's fault point)."""

    def __init__(self, path: Path | str, *, before_write: Callable[[], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self._before_write = before_write

    def write_data(self, plan: Any, planner: Any) -> Any:
        with _plain_disk_full():
            if self._before_write is not None:
                self._before_write()
            return super().write_data(plan, planner)

    def finish(self, metadata: Any, results: Any) -> None:
        with _plain_disk_full():
            super().finish(metadata, results)


def save_state(state: dict[str, Any], directory: Path, *,
               before_write: Callable[[], None] | None = None) -> None:
    """`dcp.save` of `state` into `directory` (every rank calls it) through `DiskAwareWriter`."""
    dcp.save(state, storage_writer=DiskAwareWriter(directory, before_write=before_write))
