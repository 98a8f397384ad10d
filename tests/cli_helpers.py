"""Run the `mtp` CLI of this checkout in a subprocess, as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SPECS = REPO_ROOT / "specs"


def run_mtp(*args: str, cwd: Path | None = None, timeout: float = 120,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m mtp_cli ARGS`: returns the completed process (stdout, stderr, returncode)."""
    return subprocess.run(
        [sys.executable, "-m", "mtp_cli", *args], cwd=cwd or REPO_ROOT, capture_output=True,
        text=True, timeout=timeout, env=env,
    )
