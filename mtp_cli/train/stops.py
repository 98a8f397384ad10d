"""Training that stops on purpose (a non-finite step, a full disk), and how a worker tells the
launcher so.

torch elastic restarts a worker group after any failure when `--max-restarts` is set, so a stop
that would only repeat must not look like one. A stop every rank reaches at the same point
(`agreed`: a non-finite step, judged from globally reduced values) ends every worker with exit
0 after global rank 0 wrote `RUN_DIR/stopped.json`; the launcher finds that record, prints its
message and exits 1 (the next launch removes it). A stop found by one rank alone (a full disk while rank 0 writes) exits that
worker with `STOPPED_EXIT` after printing the message; the launcher then exits 1 without
torch elastic's failure report. Either message ends with what `checkpoints/latest` names.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any

from mtp_cli.checkpoint.disk_full import find_disk_full
from mtp_cli.checkpoint.files import CheckpointFileError, read_json_object
from mtp_cli.checkpoint.publish import atomic_write_text
from mtp_cli.checkpoint.run_dir import RunDir, read_latest

STOPPED_EXIT = 3  # a worker printed why it stopped; the launcher exits STOPPED_RUN_EXIT
STOPPED_RUN_EXIT = 1


class TrainingStopped(Exception):
    """Training stopped on purpose; `message` says why."""

    agreed = False  # every rank raises it at the same point

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class NonFiniteStop(TrainingStopped):
    agreed = True


class DiskFull(TrainingStopped):
    pass


def last_good_checkpoint(run_dir: RunDir) -> str:
    name, _ = read_latest(run_dir.checkpoints)
    if name is None:
        return "no checkpoint has been completed yet"
    return f"{run_dir.latest_marker} still names {name}, the last good checkpoint"


def disk_full(error: BaseException, doing: str) -> DiskFull | None:
    """A `DiskFull` stop for `error` when the disk filled up while `doing`; else None."""
    full = find_disk_full(error)
    if full is None:
        return None
    where = f" ({full.filename})" if full.filename else ""
    return DiskFull(f"the disk is full: {doing} failed with {full.strerror or 'ENOSPC'}{where}")


@contextlib.contextmanager
def stop_on_disk_full(doing: str) -> Iterator[None]:
    """Turn a full disk met while `doing` into a `DiskFull` stop; other errors pass."""
    try:
        yield
    except TrainingStopped:
        raise
    except BaseException as error:
        stop = disk_full(error, doing)
        if stop is None:
            raise
        raise stop from None


def report_stop(stop: TrainingStopped, run_dir: RunDir, *, is_main: bool) -> int:
    """The worker's exit code for `stop`, after recording or printing its message."""
    message = f"{stop.message}; {last_good_checkpoint(run_dir)}"
    if stop.agreed:
        if not is_main:
            return 0
        try:
            atomic_write_text(run_dir.stop_record, json.dumps(
                {"message": message, "exit_code": STOPPED_RUN_EXIT}) + "\n")
            return 0
        except OSError:
            pass  # could not record it (the disk is full too): fail instead
    if is_main:
        print(f"error: {message}", file=sys.stderr, flush=True)
    return STOPPED_EXIT


def clear_stop_record(run_dir: RunDir) -> None:
    with contextlib.suppress(FileNotFoundError):
        run_dir.stop_record.unlink()


def read_stop_record(run_dir: RunDir) -> dict[str, Any] | None:
    """The stop the workers recorded, or None when they finished normally. It stays in the
    run directory (every launcher of a multi-node job reads it) until the next launch."""
    try:
        record = read_json_object(run_dir.stop_record, limit=1 << 20)
    except CheckpointFileError:
        return None
    message = record.get("message")
    code = record.get("exit_code")
    return {"message": message if isinstance(message, str) else "training stopped",
            "exit_code": code if type(code) is int else STOPPED_RUN_EXIT}
