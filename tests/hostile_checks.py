"""Checks shared by the hostile-input tests of issue 23: what a refusal looks like (exit 2, the
needles, no traceback) and a listing of a directory to prove a refused command changed nothing."""

from __future__ import annotations

from pathlib import Path


def listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under `root`: (size, mtime in ns), to compare before/after."""
    out = {}
    for path in [root, *root.rglob("*")]:
        info = path.lstat()
        out[str(path.relative_to(root))] = (info.st_size, info.st_mtime_ns)
    return out


def refused(result, *needles: str) -> str:
    """Exit 2, no traceback, every needle in the message; the message."""
    text = result.stdout + result.stderr
    assert result.returncode == 2, (result.returncode, text[-3000:])
    assert "Traceback" not in text, text[-3000:]
    for needle in needles:
        assert needle in text, (needle, text[-3000:])
    return text
