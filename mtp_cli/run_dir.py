"""The run directory: its layout, its lock, and the clean-up a fresh start or a resume needs.

```
RUN_DIR/
  .lock               fcntl lock held by the launcher for the whole job
  metrics.jsonl       one JSON object per line
  tb/                 TensorBoard event files
  checkpoints/latest  name of the newest complete checkpoint
  checkpoints/step_NNNNNNN/
```
Only these names are ever removed (`--overwrite` never deletes anything else a user keeps in
the directory).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtp_cli.errors import Problem, UserError

CHECKPOINT_PREFIX = "step_"
TEMP_MARKER = ".tmp-"


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:07d}"


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
        return self.root / "checkpoints"

    @property
    def latest_marker(self) -> Path:
        return self.checkpoints / "latest"

    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint `latest` names, if it is complete (its meta.json exists)."""
        try:
            name = self.latest_marker.read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        path = self.checkpoints / name
        if not name or TEMP_MARKER in name or not (path / "meta.json").is_file():
            return None
        return path

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
        """Remove all but the newest `keep_last` complete checkpoints."""
        if keep_last is None or not self.checkpoints.is_dir():
            return []
        done = sorted(p for p in self.checkpoints.iterdir()
                      if p.name.startswith(CHECKPOINT_PREFIX) and TEMP_MARKER not in p.name
                      and p.is_dir())
        old = done[:-keep_last]
        for path in old:
            shutil.rmtree(path, ignore_errors=True)
        return old


def read_meta(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint's meta.json."""
    with open(checkpoint / "meta.json", encoding="utf-8") as handle:
        return json.load(handle)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, fsync it, then `os.replace` it in."""
    tmp = path.with_name(f"{path.name}{TEMP_MARKER}{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the lines of steps <= `last_step` (drop what a killed run wrote after its last
    checkpoint, and a half-written last line), so a resumed run's history reads as one run."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= last_step:
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
    """

    def __init__(self, run_dir: RunDir, *, shared: bool = False) -> None:
        self.run_dir, self.shared = run_dir, shared
        self._handle: Any = None

    def acquire(self) -> None:
        handle = open(self.run_dir.lock_file, "a+", encoding="utf-8")  # noqa: SIM115
        mode = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
        try:
            fcntl.flock(handle, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
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
