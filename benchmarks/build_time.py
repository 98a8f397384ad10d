"""`mtp build` wall time and peak memory, each spec in a fresh process.

Issue 2's targets: specs/tiny.yaml answers in under 5 s; the DeepSeek-V3-dimension spec (~39B
parameters, 32 pipeline stages) in under 10 s and under 1 GiB peak memory, because the model is
compiled on the meta device. Issue 14's: DeepSeek-V3 itself (671B + MTP, 256 experts in 58
layers and the MTP layer, 32 stages) and GLM-4.5-Air in under 10 s and 2 GiB. The CPU seconds
column is the child's own CPU time: on a shared machine it is the wall time the build would take
alone. Run: `python benchmarks/build_time.py`.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPECS = ["specs/tiny.yaml", "specs/gpt_125m.yaml", "specs/deepseek_v3_dense_dims.yaml",
         "specs/deepseek_v3.yaml", "specs/glm4_5_air.yaml"]
TARGETS = {"specs/tiny.yaml": 5.0, "specs/deepseek_v3_dense_dims.yaml": 10.0,
           "specs/deepseek_v3.yaml": 10.0, "specs/glm4_5_air.yaml": 10.0}
MEMORY_MIB = {"specs/deepseek_v3_dense_dims.yaml": 1024, "specs/deepseek_v3.yaml": 2048,
              "specs/glm4_5_air.yaml": 2048}


CHILD = """
import resource, sys
from mtp_cli.cli import app
try:
    app(["build", sys.argv[1], "--json"])
except SystemExit as done:
    assert not done.code, done.code
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(spec: str) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS MiB) of `mtp build SPEC --json`, fresh process."""
    start, cpu = time.perf_counter(), _children_cpu()
    done = subprocess.run([sys.executable, "-c", CHILD, spec], cwd=ROOT, check=True,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    peak = int(done.stderr.strip().splitlines()[-1]) / 1024  # ru_maxrss is KiB
    return seconds, _children_cpu() - cpu, peak


def main() -> None:
    baseline_start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, mtp_cli.cli"], cwd=ROOT, check=True)
    baseline = time.perf_counter() - baseline_start
    print(f"baseline: python + import torch + mtp_cli: {baseline:.2f} s")
    print(f"{'spec':40} {'wall s':>8} {'cpu s':>7} {'x import':>9} {'peak MiB':>9}  target")
    for spec in SPECS:
        seconds, cpu, peak = measure(spec)
        target = TARGETS.get(spec)
        verdict = "" if target is None else (
            f"< {target:.0f} s: {'ok' if seconds < target else 'MISSED'}")
        if spec in MEMORY_MIB:
            limit = MEMORY_MIB[spec]
            verdict += f"; < {limit} MiB: {'ok' if peak < limit else 'MISSED'}"
        print(f"{spec:40} {seconds:8.2f} {cpu:7.2f} {seconds / baseline:9.2f} {peak:9.0f}  "
              f"{verdict}")


if __name__ == "__main__":
    main()
