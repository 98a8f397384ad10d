"""Which checkpoint the workers resume from, decided once by global rank 0.

Rank 0 removes the temporaries of saves that never finished, resolves the run directory
(`RunDir.resolve`: `latest`, or the newest checkpoint that validates), moves checkpoints newer
than the chosen one to `checkpoints/abandoned/` and points `latest` at the chosen one. It
broadcasts the choice - or the error, so that no rank waits for a broadcast that never comes
and every rank exits 2 with the same message.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from mtp_cli.checkpoint.run_dir import RunDir
from mtp_cli.errors import UserError


def decide_resume(run_dir: RunDir, echo: Callable[[str], None]) -> tuple[str, Any]:
    """Rank 0's part: ("resume", name), ("fresh", None) or ("error", problems)."""
    try:
        run_dir.remove_stale_temporaries()
        resolution = run_dir.resolve()
    except UserError as error:
        return "error", error.problems
    if resolution.checkpoint is None:
        return "fresh", None
    chosen = resolution.checkpoint.path.name
    for moved in run_dir.abandon(resolution.newer):
        echo(f"moved {moved.name} to {moved.parent}: it is newer than {chosen}, the checkpoint "
             "this run resumes from (kept there, never pruned)")
    if resolution.warnings:  # latest did not name it: it does from now on
        run_dir.point_latest(chosen)
    return "resume", chosen


def choose_checkpoint(run_dir: RunDir, *, is_main: bool,
                      echo: Callable[[str], None] = print) -> Path | None:
    """The checkpoint directory to load on every rank (None: a fresh start); every rank calls
    it. `UserError` on every rank when checkpoints exist and none validates."""
    box: list[Any] = [decide_resume(run_dir, echo) if is_main else None]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise UserError(problems=value)
    return run_dir.checkpoints / value if kind == "resume" else None
