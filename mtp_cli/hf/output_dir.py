"""An output directory that appears whole or not at all (`mtp export --out`, `mtp import --out`).

Everything is written into a temporary sibling `NAME.tmp-<random>`, fsynced, then renamed to
NAME (`mtp_cli.checkpoint.publish`, the staged publish `mtp train` uses for its checkpoints). An
existing NAME needs `--overwrite`: it is renamed aside first, the new directory renamed in, and
the old one deleted, so NAME never holds a half-written result; a failure (or Ctrl-C) deletes the
temporary directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from mtp_cli.checkpoint import publish
from mtp_cli.errors import Problem, UserError


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


class StagedDirectory(publish.StagedDirectory):
    """`with StagedDirectory(final, overwrite=...) as temp:` write into `temp`; on a clean exit
    it becomes `final`, on an exception it is deleted. `check_output` decides first whether
    `final` may be written at all."""

    def __init__(self, final: Path, *, overwrite: bool, option: str = "--out",
                 source: Path | None = None) -> None:
        check_output(Path(final), overwrite=overwrite, option=option, source=source)
        super().__init__(final)
