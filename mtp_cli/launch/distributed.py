"""The worker's process group and device, and its tie to the launcher's life.

One device per process: CUDA device LOCAL_RANK with nccl when CUDA is available, the CPU with
gloo otherwise. A worker must never outlive its launcher (an orphan would keep writing the run
directory after the job is gone): on Linux the kernel SIGKILLs it when the launcher dies
(`PR_SET_PDEATHSIG`); elsewhere a watchdog thread notices the launcher is gone.

The default process group is initialised here and nowhere else (the worker's real one, and the
dry run's fake one); every other group is the mesh's (`mtp_cli.parallel.mesh`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist

from mtp_cli.parallel.mesh import DistEnv

LAUNCHER_PID_ENV = "MTP_LAUNCHER_PID"
PR_SET_PDEATHSIG = 1


def exit_with_launcher() -> None:
    """Arrange for this process to die with the launcher that started it."""
    launcher = int(os.environ.get(LAUNCHER_PID_ENV, "0"))
    if not launcher:
        return
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    else:
        threading.Thread(target=_watch_launcher, args=(launcher,), daemon=True).start()
    if os.getppid() != launcher:  # it died before the death signal was armed
        os._exit(1)


def _watch_launcher(launcher: int) -> None:
    while os.getppid() == launcher:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def distributed() -> Iterator[DistEnv]:
    """Initialise the default process group from the launcher's environment; tear it down."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    try:
        yield DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(),
                      local_rank=local_rank, device=device)
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def fake_distributed(rank: int, world_size: int) -> Iterator[None]:
    """A fake default process group (collectives return at once, nothing is sent): a dry run
    builds rank `rank`'s share of a `world_size`-rank job in this one process."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()
