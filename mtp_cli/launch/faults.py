"""Test-only fault points, switched on by environment variables (all unset in real runs).

The tests of crash safety need a crash at a known place; these put it there. The worker passes
`EnvFaults` to the trainer (`mtp_cli.train.faults.FaultPoints` is the protocol and the no-op):

- `MTP_TEST_FAIL_DURING_CHECKPOINT=STEP`: rank 0 is SIGKILLed after the DCP shards of step
  STEP's checkpoint are written and before it is complete (no meta.json, not renamed).
- `MTP_TEST_HANG_AT_STEP=STEP`: every rank stops after step STEP (and its checkpoint) and waits
  forever, so a test can kill the job at a known step.
- `MTP_TEST_KILL_RANK_AT_STEP=RANK:STEP`: that rank SIGKILLs itself after step STEP, on the
  first attempt only (`TORCHELASTIC_RESTART_COUNT` 0), so the launcher's restart can resume.
- `MTP_TEST_DISK_FULL=RANK:STEP`: that rank's shard writes of step STEP's checkpoint fail as on
  a full disk; `MTP_TEST_DISK_FULL=start`: rank 0's first write of the run does. Both raise
  what `torch.save` raises there: `RuntimeError("... unexpected pos ...")` whose context is
  `OSError(ENOSPC)` (tests cannot mount a small filesystem everywhere).
- `MTP_TEST_NONFINITE_AT_STEP=STEP[,STEP...]`: every gradient of those steps becomes +inf on
  every rank, after the gradients are reduced and before the norm, so the step's loss stays
  finite and its gradient norm does not, whatever the CPU's arithmetic (a huge learning rate
  diverges at a step that depends on it).
"""

from __future__ import annotations

import errno
import math
import os
import signal
import time
from collections.abc import Sequence

import torch
from torch import nn

from mtp_cli.train.faults import FaultPoints


def _step_from_env(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def raise_disk_full() -> None:
    """Raise what `torch.save` raises on a full disk."""
    try:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError:  # raised in the handler: the OSError is only the context, as in torch.save
        raise RuntimeError(  # noqa: B904
            "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


class EnvFaults(FaultPoints):
    """The fault points the `MTP_TEST_*` variables switch on (read at each point)."""

    def fail_during_checkpoint(self, step: int, rank: int) -> None:
        if rank == 0 and _step_from_env("MTP_TEST_FAIL_DURING_CHECKPOINT") == step:
            _kill_self()

    def hang(self, step: int) -> None:
        if _step_from_env("MTP_TEST_HANG_AT_STEP") == step:
            while True:  # killed from outside
                time.sleep(0.1)

    def kill_rank(self, step: int, rank: int) -> None:
        value = os.environ.get("MTP_TEST_KILL_RANK_AT_STEP")
        if not value or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
            return
        kill_rank, kill_step = (int(v) for v in value.split(":"))
        if (rank, step) == (kill_rank, kill_step):
            _kill_self()

    def disk_full(self, step: int, rank: int) -> None:
        if os.environ.get("MTP_TEST_DISK_FULL") == f"{rank}:{step}":
            raise_disk_full()

    def disk_full_at_start(self, rank: int) -> None:
        if rank == 0 and os.environ.get("MTP_TEST_DISK_FULL") == "start":
            raise_disk_full()

    @torch.no_grad()
    def corrupt_gradients(self, step: int, chunks: Sequence[nn.Module]) -> None:
        value = os.environ.get("MTP_TEST_NONFINITE_AT_STEP", "")
        if str(step) not in value.split(","):
            return
        for chunk in chunks:
            for param in chunk.parameters():
                if param.grad is not None:
                    param.grad.fill_(math.inf)
