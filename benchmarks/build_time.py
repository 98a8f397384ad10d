"""`mtp build` wall time and peak memory, each spec in a fresh process.

Issue 2's targets: specs/tiny.yaml answers in under 5 s; the DeepSeek-V3-dimension spec (~39B
parameters, 32 pipeline stages) in under 10 s and under 1 GiB peak memory, because the model is
compiled on the meta device. Run: `python benchmarks/build_time.py`.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPECS = ["specs/tiny.yaml", "specs/gpt_125m.yaml", "specs/deepseek_v3_dense_dims.yaml"]
TARGETS = {"specs/tiny.yaml": 5.0, "specs/deepseek_v3_dense_dims.yaml": 10.0}


CHILD = """
import resource, sys
from mtp_cli.cli import app
try:
    app(["build", sys.argv[1], "--json"])
except SystemExit as done:
    assert not done.code, done.code
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def measure(spec: str) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of `mtp build SPEC --json` in a fresh process."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, spec], cwd=ROOT, check=True,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    return seconds, int(done.stderr.strip().splitlines()[-1]) / 1024  # ru_maxrss is KiB


def main() -> None:
    baseline_start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, mtp_cli.cli"], cwd=ROOT, check=True)
    baseline = time.perf_counter() - baseline_start
    print(f"baseline: python + import torch + mtp_cli: {baseline:.2f} s")
    print(f"{'spec':40} {'wall s':>8} {'x import':>9} {'peak MiB':>9}  target")
    for spec in SPECS:
        seconds, peak = measure(spec)
        target = TARGETS.get(spec)
        verdict = "" if target is None else (
            f"< {target:.0f} s: {'ok' if seconds < target else 'MISSED'}")
        if spec.endswith("deepseek_v3_dense_dims.yaml"):
            verdict += f"; < 1024 MiB: {'ok' if peak < 1024 else 'MISSED'}"
        print(f"{spec:40} {seconds:8.2f} {seconds / baseline:9.2f} {peak:9.0f}  {verdict}")


if __name__ == "__main__":
    main()
