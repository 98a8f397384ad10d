"""What another command must never replace: run directories, their checkpoints, checkpoints.

`mtp export --out` and `mtp import --out` replace a directory whole (`--overwrite`). A path as
typed says little (`R/checkpoints/step_0000020`, `.`, `..`, a link), so the output is judged
by what its resolved path is, holds and lies inside (`hf.output_dir.check_output`); this module
says which directories are run data, in the format's own names.
"""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from mtp_cli.checkpoint.layout import CHECKPOINTS, META_JSON, checkpoint_step
from mtp_cli.checkpoint.run_dir import RunDir, has_checkpoints

DCP_METADATA = ".metadata"
WALK_LIMIT = 100_000  # entries below an --overwrite output searched for run data


def _lock_in_use(lock: Path) -> bool:
    """Whether some process holds an `fcntl` lock on regular file `lock` (probed without
    following a link, released at once)."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing releases a lock this probe took
    return False


def holds_run_lock(directory: Path) -> bool:
    """Whether `directory` holds a run directory's `.lock`: one in use, or beside what a run
    writes (a bare `.lock` is too common a name to mean a run: pytest's temporary roots)."""
    run = RunDir(directory)
    if not os.path.lexists(run.lock_file):
        return False
    beside = (run.checkpoints, run.metrics, run.tb, run.stop_record)
    return any(os.path.lexists(p) for p in beside) or _lock_in_use(run.lock_file)


def run_data_kind(directory: Path) -> str | None:
    """What run data `directory` is ("a run directory", "a checkpoint", ...); None for none."""
    run = RunDir(directory)
    if holds_run_lock(directory):
        return f"a run directory (it holds {run.lock_file.name})"
    if has_checkpoints(run.checkpoints):
        return "a run directory (it holds checkpoints)"
    if directory.name == CHECKPOINTS and has_checkpoints(directory):
        return "a run directory's checkpoints"
    if os.path.lexists(directory / META_JSON) or os.path.lexists(directory / DCP_METADATA):
        return "a checkpoint"
    if checkpoint_step(directory.name) is not None and directory.parent.name == CHECKPOINTS:
        return "a checkpoint"
    return None


def is_run_directory(directory: Path) -> bool:
    """Whether `directory` is a run directory itself (not one of its checkpoints)."""
    return holds_run_lock(directory) or has_checkpoints(RunDir(directory).checkpoints)


def enclosing_run_data(path: Path) -> tuple[Path, str] | None:
    """The nearest directory above resolved `path` that is run data, and what it is."""
    for parent in path.parents:
        kind = run_data_kind(parent)
        if kind is not None:
            return parent, kind
    return None


def _subdirectories(root: Path, skip: Path | None) -> Iterator[Path]:
    """Every directory below `root` (links not followed), `skip`'s subtree left out; raises
    `OverflowError` past `WALK_LIMIT` entries."""
    seen = 0
    for current, dirs, files in os.walk(root, followlinks=False):
        seen += len(dirs) + len(files)
        if seen > WALK_LIMIT:
            raise OverflowError(seen)
        here = Path(current)
        dirs[:] = [d for d in dirs if skip is None or here / d != skip]
        for name in dirs:
            yield here / name


def run_data_within(root: Path, *, own_checkpoints: bool = False) -> tuple[Path, str] | None:
    """The first directory below `root` that is run data, and what it is; `own_checkpoints`:
    `root` is a run directory being replaced whole, its own `checkpoints/` not counted.
    `OverflowError` when `root` holds more than `WALK_LIMIT` entries."""
    skip = RunDir(root).checkpoints if own_checkpoints else None
    for directory in _subdirectories(root, skip):
        kind = run_data_kind(directory)
        if kind is not None:
            return directory, kind
    return None
