"""Run the `mtp` CLI on hostile input the way an attacker's file would meet it: in a fresh
process whose address space is capped (`RLIMIT_AS`) and whose run time is bounded, so that a
bomb shows up as a failed test instead of a frozen machine."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.cli_helpers import REPO_ROOT

MEMORY_LIMIT = 3 * 2**30  # address space: torch alone maps ~0.7 GiB
TIME_LIMIT = 60.0  # seconds, generous for 2 shared cores; a refusal takes a few


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    cpu_seconds: float  # the process's own CPU time: what it did, however busy the machine

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_bounded(*args: str, cwd: Path | None = None, memory: int = MEMORY_LIMIT,
                timeout: float = TIME_LIMIT, env: dict[str, str] | None = None) -> Outcome:
    """`python -m mtp_cli ARGS` under an address-space limit and a timeout."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    before = _children_cpu_seconds()
    result = subprocess.run(
        [sys.executable, "-m", "mtp_cli", *args], cwd=cwd or REPO_ROOT, capture_output=True,
        text=True, timeout=timeout, preexec_fn=limit, env={**os.environ, **(env or {})},
    )
    return Outcome(result.returncode, result.stdout, result.stderr,
                   _children_cpu_seconds() - before)


def _children_cpu_seconds() -> float:
    """User + system CPU time of this process's finished children (one runs at a time here).
    Wall time would measure the other processes sharing the cores too."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def assert_refused(outcome: Outcome, *needles: str) -> str:
    """Exit 2, no traceback, no memory error, and every needle in the message."""
    text = outcome.output
    assert outcome.returncode == 2, (outcome.returncode, text[-3000:])
    assert "Traceback" not in text, text[-3000:]
    assert "MemoryError" not in text, text[-3000:]
    flat = " ".join(text.split())
    for needle in needles:
        assert needle in flat, (needle, text[-3000:])
    return flat


def tree(root: Path) -> list[str]:
    """Every path below `root` (relative, sorted): what a refused command must not change."""
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))
