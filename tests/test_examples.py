"""The README's examples keep running."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.cli_helpers import REPO_ROOT, run_mtp


@pytest.mark.slow  # each script in its own interpreter
@pytest.mark.parametrize("script", ["python_api.py", "packed_documents.py"])
def test_python_examples_run(script):
    result = subprocess.run([sys.executable, str(REPO_ROOT / "examples" / script)],
                            capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    if script == "packed_documents.py":
        assert "[2, 3, 0, 5, 0]" in result.stdout
        # packed equals separate to float32 rounding (not bitwise: the kernels may sum in
        # another order on packed shapes)
        match = re.search(r"max \|packed - separate\| over loss positions: (\S+)", result.stdout)
        assert match is not None, result.stdout
        assert float(match.group(1)) <= 1e-5
        assert "equal to float32 rounding" in result.stdout
    else:
        assert "mtp_3 loss" in result.stdout


@pytest.mark.parametrize("spec", ["custom_layer_spec.yaml", "deepseek_lambda_schedule.yaml"])
def test_example_specs_build(spec):
    result = run_mtp("build", f"examples/{spec}", "--json")
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_lambda_schedule_example_switches_within_its_run(tmp_path):
    """The example trains as written and its λ drops from 0.3 to 0.1 halfway (step 51)."""
    run_dir = tmp_path / "lambda"
    result = run_mtp("train", "examples/deepseek_lambda_schedule.yaml", "--run-dir",
                     str(run_dir), timeout=900, real_process=True)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    scales = {line["step"]: line["mtp_loss_scale"] for line in lines if "split" not in line}
    assert sorted(scales) == list(range(1, 101))
    assert {scales[s] for s in range(1, 51)} == {0.3}  # tokens seen before step 50: 50,176
    assert {scales[s] for s in range(51, 101)} == {0.1}  # from 51,200 tokens on
