"""Run a function in N real processes joined by a gloo process group."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, init_file: str, fn: Callable[..., Any],
            args: tuple[Any, ...]) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # torch has already sized its intra-op pool (one thread per core) before the variable above
    # is read: several spinning pools on a small shared machine make tiny ops 20-50x slower.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    try:
        fn(rank, world_size, *args)
        # every rank done with every collective before any tears the group down: a gloo peer
        # closing its pairs under another's pending work aborts that process (SIGABRT)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any) -> None:
    """Call `fn(rank, world_size, *args)` in `world_size` gloo processes; re-raise failures.

    The processes are forked from this one (where the platform can), which has imported torch
    and the code under test already: a spawned interpreter spends ~4 s of CPU re-importing them,
    most of a small test's time. Spawned otherwise; then `fn` must be a module-level function.
    """
    method = "fork" if hasattr(os, "fork") and sys.platform != "darwin" else "spawn"
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(world_size, os.path.join(tmp, "rendezvous"), fn, args),
                           nprocs=world_size, join=True, start_method=method)
