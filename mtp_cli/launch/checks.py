"""Launch-time checks of what `mtp train` is about to use, made before anything is created.

Each `check_*` raises a `UserError` naming the option, key or file at fault. They run in the
launcher, with no process group and nothing written, so a refusal leaves the disk as it was:
the rendezvous flags, the backend's libraries, and the entries of an existing run directory
(the lock file, `metrics.jsonl`, `tb/`, `checkpoints/`) that training would otherwise trip over
only after its first steps.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from mtp_cli.checkpoint.run_dir import RunDir
from mtp_cli.config.schema import RunSpec
from mtp_cli.errors import Problem, UserError

RDZV_BACKENDS = ("c10d", "static")


def check_rendezvous(backend: str, endpoint: str | None) -> None:
    """`--rdzv-backend` is one we run; `--rdzv-endpoint` is HOST[:PORT] with a port that exists."""
    problems = []
    if backend not in RDZV_BACKENDS:
        problems.append(Problem(
            f"unknown rendezvous backend {backend!r}", file="--rdzv-backend",
            hint=f"use one of: {', '.join(RDZV_BACKENDS)}"))
    if endpoint is not None:
        problem = _endpoint_problem(endpoint)
        if problem:
            problems.append(Problem(f"{endpoint!r}: {problem}", file="--rdzv-endpoint",
                                    hint="HOST:PORT, e.g. node0:29400 or [::1]:29400"))
    if problems:
        raise UserError(problems=problems)


def _endpoint_problem(endpoint: str) -> str | None:
    """Why `endpoint` is not HOST[:PORT] (None when it is)."""
    text = endpoint.strip()
    if not text:
        return "empty"
    if text.startswith("["):  # [IPv6]:port
        host, _, rest = text[1:].partition("]")
        if not rest.startswith(":") and rest:
            return "expected [IPv6]:PORT"
        port = rest[1:] if rest else None
    elif text.count(":") > 1:
        return "an IPv6 address needs brackets: [ADDRESS]:PORT"
    else:
        host, sep, port_text = text.partition(":")
        port = port_text if sep else None
    if not host or any(c.isspace() or c in "/@?#" for c in host):
        return "not a host name"
    if port is not None and not (port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535):
        return f"port {port[:20]!r} is not a number from 1 to 65535"
    return None


def check_backend(spec: RunSpec) -> None:
    """`model.backend=te` needs Transformer Engine importable here (as `mtp build` needs it)."""
    if spec.model.backend != "te":
        return
    from mtp_cli.models.te import TE_INSTALL_HINT

    try:
        import transformer_engine.pytorch  # type: ignore[import-not-found]  # noqa: F401
    except Exception as error:  # ImportError, or a broken CUDA install raising at import
        raise UserError(problems=[Problem(
            f"{TE_INSTALL_HINT} ({type(error).__name__}: {error})", key="model.backend",
        )]) from None


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISREG, "a regular file"),
                       (stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "a special file"


def _entry_problem(path: Path, want_dir: bool) -> str | None:
    """Why training could not use `path` as its directory / appendable file (None: it can)."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return None
    except OSError as error:
        return f"cannot be examined ({error.strerror})"
    want = "a directory" if want_dir else "a regular file"
    if _kind(mode) != want:
        return f"is {_kind(mode)}, expected {want}"
    access = os.W_OK | os.X_OK if want_dir else os.W_OK
    if not os.access(path, access):
        return "is not writable"
    return None


def check_run_dir_entries(run_dir: RunDir) -> None:
    """The run directory's own entries are of the right type and writable.

    `.lock` must be a regular file (never a link: the lock is opened without following one);
    `tb/` and `checkpoints/` directories, `metrics.jsonl` a regular file. An entry of the wrong
    type is not ours, so `--overwrite` does not delete it either: it is reported.
    """
    if not run_dir.root.is_dir():
        return
    problems = []
    for path, want_dir in ((run_dir.lock_file, False), (run_dir.metrics, False),
                           (run_dir.tb, True), (run_dir.checkpoints, True)):
        problem = _entry_problem(path, want_dir)
        if problem:
            problems.append(Problem(problem, file=str(path),
                                    hint="move it away, or pass another --run-dir"))
    if not os.access(run_dir.root, os.W_OK | os.X_OK):
        problems.append(Problem("the run directory is not writable", file=str(run_dir.root),
                                hint="pass another --run-dir"))
    if problems:
        raise UserError(problems=problems)
