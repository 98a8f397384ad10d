"""The run directory: its layout, its lock, which checkpoint a resume uses, and the clean-up a
fresh start or a resume needs.

```
RUN_DIR/
  .lock                   fcntl lock held by the launcher for the whole job
  metrics.jsonl           one JSON object per line
  tb/                     TensorBoard event files
  stopped.json            why the last job stopped on purpose (removed by the next launch)
  checkpoints/latest      name of the newest complete checkpoint
  checkpoints/step_NNNNNNN/
  checkpoints/abandoned/  checkpoints newer than the one a resume used (kept, never pruned)
```
Only these names are ever removed (`--overwrite` never deletes anything else a user keeps in
the directory). A complete checkpoint is never deleted except by `checkpoint.keep_last`
pruning of checkpoints older than the one `latest` names.

Which checkpoint a run resumes from (`RunDir.resolve`, shared by `mtp train` and
`inspect-ckpt`): the one `latest` names when `latest` is a bare sibling name and that checkpoint
validates (`checkpoint.validate`); otherwise the newest one that validates, with a warning
saying which and why; none validating while some exist is an error, never a fresh start.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtp_cli.checkpoint.files import MARKER_LIMIT, CheckpointFileError, read_text
from mtp_cli.checkpoint.layout import (
    ABANDONED,
    CHECKPOINTS,
    LATEST,
    TEMP_MARKER,
    checkpoint_step,
)
from mtp_cli.checkpoint.layout import checkpoint_name as checkpoint_name  # importable here too
from mtp_cli.checkpoint.publish import atomic_write_text
from mtp_cli.checkpoint.validate import ValidCheckpoint, validate_checkpoint
from mtp_cli.errors import Problem, UserError


@dataclass(frozen=True)
class Resolution:
    """Which checkpoint a run directory resumes from, and what choosing it left aside."""

    checkpoint: ValidCheckpoint | None  # None: nothing to resume from (a fresh start)
    warnings: tuple[str, ...] = ()  # why `latest` was not used, what was skipped
    newer: tuple[Path, ...] = ()  # checkpoint directories past the chosen one

    @property
    def step(self) -> int | None:
        return self.checkpoint.step if self.checkpoint is not None else None


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory."""

    root: Path

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tb(self) -> Path:
        return self.root / "tb"

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def latest_marker(self) -> Path:
        return latest_marker(self.checkpoints)

    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"

    @property
    def abandoned(self) -> Path:
        return self.checkpoints / ABANDONED

    @property
    def stop_record(self) -> Path:
        return self.root / "stopped.json"

    def resolve(self, *, checksums: bool = True) -> Resolution:
        """The checkpoint to resume from (see the module docstring); `UserError` when
        checkpoints exist and none validates."""
        return resolve_checkpoints(self.checkpoints, checksums=checksums)

    def point_latest(self, name: str) -> None:
        """Make `latest` name checkpoint `name` (atomically)."""
        atomic_write_text(self.latest_marker, name + "\n")

    def abandon(self, paths: tuple[Path, ...] | list[Path]) -> list[Path]:
        """Move checkpoint directories to `checkpoints/abandoned/` (a resume went back past
        them); returns where each went. Never deleted, never pruned, never named by latest."""
        moved = []
        for path in paths:
            self.abandoned.mkdir(exist_ok=True)
            target, copy = self.abandoned / path.name, 0
            while target.exists():
                copy += 1
                target = self.abandoned / f"{path.name}.{copy}"
            os.replace(path, target)
            moved.append(target)
        return moved

    def clear(self) -> None:
        """Forget every result of earlier runs (`--overwrite`); other files stay."""
        for path in (self.checkpoints, self.tb):
            shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            self.metrics.unlink()

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete checkpoint directories that were never renamed into place (a writer died)."""
        if not self.checkpoints.is_dir():
            return []
        stale = [p for p in self.checkpoints.iterdir() if TEMP_MARKER in p.name]
        for path in stale:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()
        return stale

    def prune(self, keep_last: int | None) -> list[Path]:
        """Remove all but the newest `keep_last` checkpoints by step number, never the one
        `latest` names nor any newer one (nor anything in `abandoned/`)."""
        if keep_last is None or not self.checkpoints.is_dir():
            return []
        name, _ = read_latest(self.checkpoints)
        latest = checkpoint_step(name) if name is not None else None
        if latest is None:
            return []
        older = [path for step, path in checkpoint_dirs(self.checkpoints) if step < latest]
        old = older[:max(len(older) - (keep_last - 1), 0)]
        for path in old:
            shutil.rmtree(path, ignore_errors=True)
        return old


def checkpoint_dirs(checkpoints: Path) -> list[tuple[int, Path]]:
    """`(step, path)` of every `step_N` directory in `checkpoints`, by step number."""
    if not checkpoints.is_dir():
        return []
    found = [(checkpoint_step(p.name), p) for p in checkpoints.iterdir()]
    return sorted((step, p) for step, p in found if step is not None and p.is_dir())


def latest_marker(checkpoints: Path) -> Path:
    """The `latest` marker of a run directory's `checkpoints/`."""
    return checkpoints / LATEST


def has_checkpoints(checkpoints: Path) -> bool:
    """Whether `checkpoints` holds a checkpoint directory or a `latest` marker (even a bad one)."""
    return bool(checkpoint_dirs(checkpoints)) or os.path.lexists(latest_marker(checkpoints))


def read_latest(checkpoints: Path) -> tuple[str | None, str | None]:
    """(the checkpoint name `latest` holds, None) when it is a bare name of a directory beside
    it; else (None, what is wrong with it)."""
    marker = latest_marker(checkpoints)
    if not os.path.lexists(marker):
        return None, f"{marker} is missing"
    try:
        name = read_text(marker, MARKER_LIMIT).strip()
    except CheckpointFileError as error:
        return None, str(error)
    if checkpoint_step(name) is None:
        return None, f"{marker} holds {name[:80]!r}, not the name of a checkpoint beside it"
    if not (checkpoints / name).is_dir():
        return None, f"{marker} names {name}, which does not exist"
    return name, None


def resolve_checkpoints(checkpoints: Path, *, checksums: bool = True) -> Resolution:
    """See `RunDir.resolve`; `checkpoints` is a run directory's `checkpoints/`."""
    found = checkpoint_dirs(checkpoints)
    name, problem = read_latest(checkpoints)
    rejected: list[CheckpointFileError] = []
    if name is not None:
        step = checkpoint_step(name)
        try:
            chosen = validate_checkpoint(checkpoints / name, step, checksums=checksums)
        except CheckpointFileError as error:
            problem = f"{latest_marker(checkpoints)} names {name}, which does not validate ({error})"
            rejected.append(error)
        else:
            return Resolution(chosen, newer=tuple(p for s, p in found if s > step))
    if not found:
        present = os.path.lexists(latest_marker(checkpoints))
        return Resolution(None, (f"{problem}; no checkpoint to resume from",) if present else ())
    for step, path in reversed(found):
        if any(error.path.is_relative_to(path) for error in rejected):
            continue
        try:
            chosen = validate_checkpoint(path, step, checksums=checksums)
        except CheckpointFileError as error:
            rejected.append(error)
            continue
        skipped = "".join(f"; skipped: {error}" for error in rejected
                          if name is None or not error.path.is_relative_to(checkpoints / name))
        warning = (f"{problem}: using {path.name}, the newest checkpoint that "
                   f"validates{skipped}")
        return Resolution(chosen, (warning,), tuple(p for s, p in found if s > step))
    raise UserError(problems=[
        Problem(f"checkpoints exist but none validates, and a run never starts afresh over "
                f"them ({problem})", file=str(checkpoints),
                hint="repair or move them, or pass --overwrite to delete them and start afresh"),
        *[Problem(error.reason, file=str(error.path)) for error in rejected],
    ])


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the lines of steps <= `last_step` (drop what a killed run wrote after its last
    checkpoint, and a half-written last line), so a resumed run's history reads as one run."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # bad JSON, or an int past 4,300 digits
            continue
        step = record.get("step", 0) if isinstance(record, dict) else None
        if type(step) is int and step <= last_step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


def check_creatable(root: Path) -> None:
    """A `UserError` unless `root` is (or can be made) a writable directory. Creates nothing."""
    probe = root
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(problems=[Problem(
            f"cannot create the run directory: {probe} is not a directory", file=str(root),
            hint="pass another --run-dir")])
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(problems=[Problem(
            f"cannot create the run directory: {probe} is not writable", file=str(root),
            hint="pass another --run-dir")])


class RunDirLock:
    """An `fcntl.flock` on RUN_DIR/.lock, held while a job uses the directory.

    Exclusive for a single-node job. Launchers of one multi-node job may share a filesystem and
    so the directory: they take a shared lock, which still keeps a single-node job out.

    The file is opened without following links (`O_NOFOLLOW`) and must be a regular file: a
    `.lock` planted as a symlink to a user's file would otherwise get that file truncated to
    "pid N".
    """

    def __init__(self, run_dir: RunDir, *, shared: bool = False) -> None:
        self.run_dir, self.shared = run_dir, shared
        self._handle: Any = None

    def _refuse(self, why: str) -> UserError:
        return UserError(problems=[Problem(
            f"{why}; refusing to use it as the run directory's lock",
            file=str(self.run_dir.lock_file), hint="remove it, or pass another --run-dir")])

    def _open(self) -> Any:
        """The lock file, opened for reading and writing without following a link."""
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self.run_dir.lock_file, flags, 0o644)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise self._refuse("is a symbolic link") from None
            raise self._refuse(f"cannot be opened ({error.strerror})") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise self._refuse("is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "r+", encoding="utf-8")

    def acquire(self) -> None:
        handle = self._open()
        mode = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
        try:
            fcntl.flock(handle, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read(200).strip() or "another process"
            handle.close()
            raise UserError(problems=[Problem(
                f"the run directory is in use by another `mtp train` ({holder})",
                file=str(self.run_dir.root), hint="wait for it, or pass another --run-dir",
            )]) from None
        if not self.shared:
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()}\n")
            handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
