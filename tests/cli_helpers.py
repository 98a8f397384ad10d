"""Run the `mtp` CLI of this checkout: in this process (the fast tier) or in a subprocess, as a
user would (`subprocess=True`, and always when an environment is given)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SPECS = REPO_ROOT / "specs"


def run_mtp(*args: str, cwd: Path | None = None, timeout: float = 120,
            env: dict[str, str] | None = None,
            real_process: bool | None = None) -> subprocess.CompletedProcess[str]:
    """`mtp ARGS`: the completed process (stdout, stderr, returncode).

    In this process by default, through the real typer app: a new interpreter costs a second or
    more of imports per call, and the fast tier makes hundreds. What a subprocess would show is
    kept: an exception that escapes the app is printed to stderr with its traceback and exits 1,
    as the interpreter would. `real_process=True` (or `env`) runs `python -m mtp_cli` for real;
    so does `mtp train` unless `real_process=False`: a launch's workers write to the process's
    file descriptors, which an in-process runner does not capture."""
    if real_process is None:
        real_process = bool(args) and args[0] == "train"
    if real_process or env is not None:
        return _subprocess_run(args, cwd, timeout, env)
    return _in_process(args, cwd)


def _subprocess_run(args: tuple[str, ...], cwd: Path | None, timeout: float,
                    env: dict[str, str] | None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mtp_cli", *args], cwd=cwd or REPO_ROOT,
                  capture_output=True, text=True, timeout=timeout, env=env)


def _in_process(args: tuple[str, ...], cwd: Path | None) -> subprocess.CompletedProcess[str]:
    from typer.testing import CliRunner

    from mtp_cli.cli import app

    with contextlib.chdir(cwd or REPO_ROOT):
        result = CliRunner().invoke(app, [str(a) for a in args], prog_name="mtp")
    stderr = result.stderr
    code = result.exit_code
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "Traceback (most recent call last):\n" + "".join(
            traceback.format_exception(result.exception))
        code = 1
    return subprocess.CompletedProcess(["mtp", *args], code, result.stdout, stderr)
