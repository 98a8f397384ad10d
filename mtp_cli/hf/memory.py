"""Giving freed tensor memory back to the operating system between streamed pieces.

glibc serves allocations under its (dynamically raised, up to 32 MiB) mmap threshold from heap
arenas and keeps them after `free`, so a process that streams tens of MB-sized tensors one after
another grows by the fragments it no longer uses. `malloc_trim(0)` returns them; the streaming
commands call it between shards so that their peak memory stays that of one shard. A no-op where
the C library has no `malloc_trim` (macOS, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Return freed heap memory to the operating system (glibc), else do nothing."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
