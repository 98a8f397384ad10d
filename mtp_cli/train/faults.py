"""Fault points: the places where a test may make a run fail, injected into the trainer and the
checkpointer. `NO_FAULTS` (every point does nothing) is what a run gets unless its caller says
otherwise; the worker passes `mtp_cli.launch.faults.EnvFaults`, which tests switch on with
environment variables. Training never imports the launcher for them.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


class FaultPoints:
    """Every fault point, doing nothing (the protocol, and the default for real runs)."""

    def disk_full_at_start(self, rank: int) -> None:
        """Before the run's first write (the metrics file's truncation)."""

    def disk_full(self, step: int, rank: int) -> None:
        """Before this rank writes its shards of step `step`'s checkpoint."""

    def fail_during_checkpoint(self, step: int, rank: int) -> None:
        """After this rank's shards of step `step`'s checkpoint, before it is complete."""

    def kill_rank(self, step: int, rank: int) -> None:
        """After step `step` (and its metrics line)."""

    def hang(self, step: int) -> None:
        """After step `step` and its checkpoint."""

    def corrupt_gradients(self, step: int, chunks: Sequence[nn.Module]) -> None:
        """Step `step`'s reduced gradients on this rank's model parts, before the norm and the
        non-finite check (every rank calls it, so every rank can agree)."""


NO_FAULTS = FaultPoints()
