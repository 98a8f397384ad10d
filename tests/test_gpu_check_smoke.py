"""benchmarks/gpu_check.py stays runnable: its CPU miniature (`--cpu-smoke`) runs every stage
for 2 steps and writes its figures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.train_helpers import REPO_ROOT


@pytest.mark.slow
def test_gpu_check_cpu_smoke_runs_every_stage(tmp_path):
    out = tmp_path / "figures.json"
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--cpu-smoke", "--json",
                           str(out)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(out.read_text())
    ran = {s["name"]: s for s in figures["stages"] if s["skip"] is None}
    assert {"125m local", "125m local packed", "1b default", "gloo 2 steps"} <= set(ran)
    for stage in ran.values():
        assert stage["steps"] == 2 and stage["tokens_per_s"] > 0, stage
    packed = figures["checks"]["packed_attention"]
    assert packed["max_abs_packed_vs_fp32_reference"] < 1e-5  # float32 on CPU
