"""Ctrl-C on `mtp train`: one line saying what stopped and what is safe on disk.

A terminal's Ctrl-C sends SIGINT to the whole foreground process group: the launcher and every
worker. Left alone, each worker prints a KeyboardInterrupt traceback (and the ranks still in a
collective add gloo's "connection closed" errors), and torchelastic logs its own shutdown.
Instead a worker exits at once, quietly, with 130 (`exit_quietly_on_sigint`: nothing is lost,
since checkpoints are published atomically and metrics lines are flushed whole), the launcher
drops torchelastic's shutdown chatter (`quiet_elastic_shutdown`), and prints `stopped_message`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path

from mtp_cli.checkpoint.run_dir import RunDir, read_latest

SIGINT_EXIT = 128 + signal.SIGINT
# torchelastic's messages while it forwards a signal to the workers and shuts them down
# (exec'd workers, then forked ones), and its traceback of the agent's own poll when a forked
# worker exits non-zero (the launcher reports the worker's failure itself)
SHUTDOWN_MESSAGES = ("Received %s death signal", "Sending process %s closing signal",
                     "Closing process %s via signal", "failed (exitcode: %s)")
ELASTIC_LOGGERS = ("torch.distributed.elastic.agent.server.api",
                   "torch.distributed.elastic.multiprocessing.api")


def exit_quietly_on_sigint() -> None:
    """In a worker: SIGINT ends the process with 130 and nothing on stderr."""
    signal.signal(signal.SIGINT, lambda *_: os._exit(SIGINT_EXIT))


class _ShutdownFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(SHUTDOWN_MESSAGES)


@contextlib.contextmanager
def quiet_elastic_shutdown() -> Iterator[None]:
    """Drop torchelastic's shutdown warnings (the launcher says what happened itself)."""
    quiet = _ShutdownFilter()
    loggers = [logging.getLogger(name) for name in ELASTIC_LOGGERS]
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


def last_logged_step(metrics: Path, tail_bytes: int = 1 << 16) -> int | None:
    """The step of the last complete training line of metrics.jsonl (read from its end)."""
    try:
        with open(metrics, "rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - tail_bytes))
            lines = handle.read().split(b"\n")[:-1]  # the last piece may be half-written
    except OSError:
        return None
    for raw in reversed(lines):
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if isinstance(record, dict) and "split" not in record and \
                isinstance(record.get("step"), int):
            return record["step"]
    return None


def stopped_message(signum: int, run_dir: RunDir) -> str:
    """`mtp train: stopped by Ctrl-C (SIGINT) after step 37; ...checkpoint...` in one line."""
    name = signal.Signals(signum).name
    what = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else name
    step = last_logged_step(run_dir.metrics)
    after = f" after step {step}" if step is not None else ""
    name, _ = read_latest(run_dir.checkpoints)  # latest names a checkpoint only once complete
    if name is None:
        saved = "no checkpoint was completed (the next run starts afresh)"
    else:
        saved = (f"the last complete checkpoint is {run_dir.checkpoints / name} (the same "
                 "command resumes from it)")
    return f"mtp train: stopped by {what}{after}; {saved}"
