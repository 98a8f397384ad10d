"""Shared fixtures: the repository's own code first on every path, clean MTP trackers."""

from __future__ import annotations

import os
import sys
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


@pytest.fixture(autouse=True)
def _fresh_mtp_tracker():
    """MTPLossLoggingHelper and MTPLossAutoScaler keep class-level state: reset per test."""
    from mtp_cli.mtp import MTPLossAutoScaler, MTPLossLoggingHelper

    MTPLossLoggingHelper.reset()
    MTPLossAutoScaler.set_loss_scale(1.0)
    yield
    MTPLossLoggingHelper.reset()
    MTPLossAutoScaler.set_loss_scale(1.0)
