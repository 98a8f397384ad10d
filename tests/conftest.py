"""Shared fixtures: the repository's own code first on every path, clean MTP trackers."""

from __future__ import annotations

import contextlib
import functools
import multiprocessing.process
import os
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# One thread per process: the distributed tests run several processes on a 2-core machine, and
# oversubscribed intra-op threads make them many times slower. Set before torch is imported so
# that in-process tests and every spawned worker inherit it; a caller's own setting wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
# Subprocesses (the CLI, torchrun workers) import this checkout's package too.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(REPO_ROOT), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that spawns torch.distributed processes is in the slow tier too: a launch
    costs seconds, and `-m "not slow"` must stay a quick check."""
    for item in items:
        if item.get_closest_marker("distributed") is not None:
            item.add_marker(pytest.mark.slow)


# ctypes.util.find_library runs ldconfig: a library lookup, not a process the test starts
LIBRARY_LOOKUP = os.path.join("ctypes", "util.py")


@contextlib.contextmanager
def _no_processes(item: pytest.Item) -> Iterator[None]:
    """The tier rule, enforced: a test not marked `slow` (or `distributed`) that starts a
    process (subprocess, multiprocessing, torch.multiprocessing: the CLI out of process, a
    launch, gloo workers) fails, naming itself, so the fast tier stays fast."""
    if item.get_closest_marker("slow") is not None:
        yield
        return

    def refuse(self: object, original: Callable[..., object], *args: object,
               **kwargs: object) -> object:
        stack = traceback.extract_stack()
        if any(frame.filename.endswith(LIBRARY_LOOKUP) for frame in stack):
            return original(self, *args, **kwargs)
        ours = [f"{frame.filename}:{frame.lineno}" for frame in stack
                if frame.filename.startswith(str(REPO_ROOT)) and "conftest" not in frame.filename]
        pytest.fail(f"{item.nodeid} starts a process (at {ours[-1] if ours else '?'}): mark it "
                    "slow (or distributed), or run it in process", pytrace=False)

    with pytest.MonkeyPatch.context() as patch:
        for owner, name in ((subprocess.Popen, "_execute_child"),
                            (multiprocessing.process.BaseProcess, "start")):
            patch.setattr(owner, name, functools.partialmethod(refuse, getattr(owner, name)))
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    with _no_processes(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with _no_processes(item):
        yield


@pytest.fixture(autouse=True)
def _fresh_mtp_tracker():
    """MTPLossLoggingHelper and MTPLossAutoScaler keep class-level state: reset per test."""
    from mtp_cli.mtp import MTPLossAutoScaler, MTPLossLoggingHelper

    MTPLossLoggingHelper.reset()
    MTPLossAutoScaler.set_loss_scale(1.0)
    yield
    MTPLossLoggingHelper.reset()
    MTPLossAutoScaler.set_loss_scale(1.0)
