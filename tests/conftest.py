"""Shared fixtures: the repository's own code first on every path, clean MTP trackers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
# Subprocesses (the CLI, torchrun workers) import this checkout's package too.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(REPO_ROOT), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
)


@pytest.fixture(autouse=True)
def _fresh_mtp_tracker():
    """MTPLossLoggingHelper and MTPLossAutoScaler keep class-level state: reset per test."""
    from mtp_cli.mtp import MTPLossAutoScaler, MTPLossLoggingHelper

    MTPLossLoggingHelper.reset()
    MTPLossAutoScaler.set_loss_scale(1.0)
    yield
    MTPLossLoggingHelper.reset()
    MTPLossAutoScaler.set_loss_scale(1.0)
