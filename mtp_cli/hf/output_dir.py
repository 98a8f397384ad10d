"""An output directory that appears whole or not at all (`mtp export --out`, `mtp import --out`),
and never at the cost of a run's data.

Everything is written into a temporary sibling `NAME.tmp-<random>`, fsynced, then renamed to
NAME (`mtp_cli.checkpoint.publish`, the staged publish `mtp train` uses for its checkpoints). An
existing NAME needs `--overwrite`: it is renamed aside first, the new directory renamed in, and
the old one deleted, so NAME never holds a half-written result; a failure (or Ctrl-C) deletes the
temporary directory, and a disk that fills (or another I/O fault) is a `UserError` saying what
was written and that the previous NAME is intact.

`--out` is judged by its resolved path (links, `.`, `..` followed), never as typed: refused when
it is or holds the current directory or an input, lies inside run data (a run directory, its
checkpoints, a checkpoint: `mtp_cli.checkpoint.protect`), or (with `--overwrite`) is or holds
run data, except that `mtp import` may replace a whole run directory, under the lock `mtp train`
holds on it (so never one in use). The temporary directory carries `STAGING_MARKER` naming the
tool, the target and the writer; the next export or import of the same NAME deletes such a
leftover of a writer that died (and only that).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
from pathlib import Path
from types import TracebackType

from mtp_cli.checkpoint import publish
from mtp_cli.checkpoint.disk_full import find_disk_full
from mtp_cli.checkpoint.files import read_json_object
from mtp_cli.checkpoint.layout import TEMP_MARKER
from mtp_cli.checkpoint.protect import (
    WALK_LIMIT,
    enclosing_run_data,
    is_run_directory,
    run_data_kind,
    run_data_within,
)
from mtp_cli.checkpoint.run_dir import RunDir, RunDirLock
from mtp_cli.errors import Problem, UserError

STAGING_MARKER = ".mtp-staging.json"
TOOLS = ("mtp export", "mtp import")
IO_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG,
                       errno.EACCES, errno.EPERM})


def _refuse(final: Path, message: str, hint: str | None = None) -> UserError:
    return UserError(problems=[Problem(message, file=str(final), hint=hint)])


def _check_place(final: Path, out: Path, option: str, sources: list[Path]) -> None:
    """`out` (resolved `final`) neither is nor holds the current directory or an input, and
    lies inside no run data."""
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise _refuse(final, f"{option} is (or holds) the current directory {cwd}",
                      "name a new directory, not . or one above it")
    for source in sources:
        given = source.resolve()
        if out == given or out in given.parents:
            raise _refuse(final, f"{option} is or holds the input {source}",
                          "write somewhere else")
        if given in out.parents:
            raise _refuse(final, f"{option} lies inside the input {source}",
                          "write somewhere else")
    enclosing = enclosing_run_data(out)
    if enclosing is not None:
        raise _refuse(final, f"{option} lies inside {enclosing[0]}, {enclosing[1]}",
                      "write outside run directories and checkpoints")


def _check_replaced(final: Path, out: Path, option: str, replace_run: bool) -> None:
    """An existing `out` that `--overwrite` would delete is, and holds, no run data (but a
    whole run directory when `replace_run`)."""
    own_run = replace_run and is_run_directory(out)
    kind = run_data_kind(out)
    if kind is not None and not own_run:
        raise _refuse(final, f"{option} is {kind}, which --overwrite would delete",
                      "write somewhere else")
    try:
        within = run_data_within(out, own_checkpoints=own_run)
    except OverflowError:
        raise _refuse(final, f"{option} holds more than {WALK_LIMIT} entries, too many to "
                             "check for run data that --overwrite would delete",
                      "name a new or emptier directory") from None
    if within is not None:
        raise _refuse(final, f"{option} holds {within[0]}, {within[1]}, which --overwrite "
                             "would delete", "write somewhere else")


def check_output(final: Path, *, overwrite: bool, option: str = "--out",
                 sources: tuple[Path, ...] | list[Path] = (), replace_run: bool = False) -> Path:
    """The resolved output path of `final`; `UserError` when it may not be written (see the
    module doc), exists without `overwrite`, or cannot be created."""
    final = Path(final)
    out = final.resolve()
    _check_place(final, out, option, [Path(s) for s in sources])
    if os.path.lexists(out) and not overwrite:
        raise _refuse(final, f"{option} already exists", "pass --overwrite to replace it")
    if os.path.lexists(out) and not out.is_dir():
        raise _refuse(final, f"{option} exists and is not a directory")
    if os.path.lexists(out):
        _check_replaced(final, out, option, replace_run)
    probe = out.parent
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise _refuse(final, f"cannot create {option}: {probe} is not a writable directory")
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def _dead_writer_leftover(path: Path, target: Path) -> bool:
    """Whether `path` is a staging directory for `target` whose writer, on this host, died."""
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        marker = read_json_object(path / STAGING_MARKER, 4096)
    except UserError:
        return False
    pid = marker.get("pid")
    return (marker.get("tool") in TOOLS and marker.get("target") == str(target)
            and marker.get("host") == socket.gethostname()
            and isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid < 2**31
            and not _alive(pid))


def remove_leftovers(target: Path) -> list[Path]:
    """Delete the staging directories of `target` that an export or import killed midway left
    (their marker names the tool, `target` and a writer on this host that no longer runs)."""
    prefix = target.name + TEMP_MARKER
    if not target.parent.is_dir():
        return []
    found = [p for p in target.parent.iterdir() if p.name.startswith(prefix)]
    stale = [p for p in found if _dead_writer_leftover(p, target)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def _written(temp: Path) -> tuple[int, int]:
    files = [p for p in temp.rglob("*") if p.is_file() and p.name != STAGING_MARKER]
    return len(files), sum(p.stat().st_size for p in files)


def io_fault(error: BaseException) -> OSError | None:
    """The I/O fault (a full disk, EIO, a read-only or vanished permission...) behind `error`."""
    return find_disk_full(error, errnos=IO_ERRNOS)


class StagedDirectory(publish.StagedDirectory):
    """`with StagedDirectory(final, overwrite=...) as temp:` write into `temp`; on a clean exit
    it becomes `final`, on an exception it is deleted. `check_output` decides first whether
    `final` may be written at all; `replace_run` (`mtp import`) holds the run directory's lock
    while an existing run directory is replaced."""

    def __init__(self, final: Path, *, overwrite: bool, option: str = "--out",
                 sources: tuple[Path, ...] | list[Path] = (), replace_run: bool = False,
                 tool: str = "mtp export") -> None:
        self.given, self.option, self.tool = Path(final), option, tool
        resolved = check_output(Path(final), overwrite=overwrite, option=option,
                                sources=sources, replace_run=replace_run)
        super().__init__(resolved)
        self.existed = os.path.lexists(resolved)
        self.lock = RunDirLock(RunDir(resolved)) \
            if replace_run and self.existed and is_run_directory(resolved) else None
        self.removed: list[Path] = []

    def __enter__(self) -> Path:
        if self.lock is not None:
            self.lock.acquire()
        try:
            self.removed = remove_leftovers(self.final)
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self.temp.mkdir()
            marker = {"tool": self.tool, "target": str(self.final), "pid": os.getpid(),
                      "host": socket.gethostname()}
            (self.temp / STAGING_MARKER).write_text(json.dumps(marker))
        except BaseException as error:
            self._discard(error)
            raise
        return self.temp

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if error is not None:
            self._discard(error)
            return
        try:
            (self.temp / STAGING_MARKER).unlink()
            self.publish()
        except BaseException as failure:
            self._discard(failure)
            raise
        finally:
            self._release()

    def _discard(self, error: BaseException) -> None:
        """Delete the temporary directory; an I/O fault becomes a `UserError` saying so."""
        count, nbytes = _written(self.temp) if self.temp.is_dir() else (0, 0)
        shutil.rmtree(self.temp, ignore_errors=True)
        self._release()
        fault = io_fault(error)
        if fault is None:
            return
        where = f" ({fault.filename})" if fault.filename else ""
        before = f"the previous {self.given} is intact" if self.existed else \
            f"{self.given} was not created"
        raise _refuse(self.given, f"{self.option}: {fault.strerror}{where} after writing "
                                  f"{count} files ({nbytes} bytes) to a temporary directory, "
                                  f"now removed; {before}") from None

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()
