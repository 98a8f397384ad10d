"""An output directory that appears whole or not at all (`mtp export --out`, `mtp import --out`).

Everything is written into a temporary sibling `NAME.tmp-<random>`, fsynced, then renamed to
NAME. An existing NAME needs `--overwrite`: it is renamed aside first, the new directory renamed
in, and the old one deleted, so NAME never holds a half-written result; a failure (or Ctrl-C)
deletes the temporary directory.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from types import TracebackType

from mtp_cli.errors import Problem, UserError

TEMP_MARKER = ".tmp-"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_output(final: Path, *, overwrite: bool, option: str = "--out",
                 source: Path | None = None) -> None:
    """`UserError` when `final` exists and may not be replaced, cannot be created, or is (or
    holds) `source`, the input that `--overwrite` would otherwise delete."""
    if source is not None:
        out, given = Path(final).resolve(), Path(source).resolve()
        if out == given or out in given.parents:
            raise UserError(problems=[Problem(f"{option} is or holds the input {source}",
                                              file=str(final), hint="write somewhere else")])
    if os.path.lexists(final) and not overwrite:
        raise UserError(problems=[Problem(f"{option} already exists", file=str(final),
                                          hint="pass --overwrite to replace it")])
    if os.path.lexists(final) and not final.is_dir():
        raise UserError(problems=[Problem(f"{option} exists and is not a directory",
                                          file=str(final))])
    probe = final.parent
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(problems=[Problem(f"cannot create {option}: {probe} is not a writable "
                                          "directory", file=str(final))])


class StagedDirectory:
    """`with StagedDirectory(final, overwrite=...) as temp:` write into `temp`; on a clean exit
    it becomes `final`, on an exception it is deleted."""

    def __init__(self, final: Path, *, overwrite: bool, option: str = "--out",
                 source: Path | None = None) -> None:
        self.final = Path(final)
        check_output(self.final, overwrite=overwrite, option=option, source=source)
        self.temp = self.final.with_name(f"{self.final.name}{TEMP_MARKER}{secrets.token_hex(4)}")

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.temp.mkdir()
        return self.temp

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if kind is not None:
            shutil.rmtree(self.temp, ignore_errors=True)
            return
        self.publish()

    def publish(self) -> None:
        _fsync(self.temp)
        old = None
        if os.path.lexists(self.final):
            old = self.final.with_name(f"{self.final.name}{TEMP_MARKER}old-"
                                       f"{secrets.token_hex(4)}")
            os.replace(self.final, old)
        os.replace(self.temp, self.final)
        _fsync(self.final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
