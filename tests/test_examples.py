"""The README's examples keep running."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.cli_helpers import REPO_ROOT, run_mtp


@pytest.mark.parametrize("script", ["python_api.py", "packed_documents.py"])
def test_python_examples_run(script):
    result = subprocess.run([sys.executable, str(REPO_ROOT / "examples" / script)],
                            capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    if script == "packed_documents.py":
        assert "[2, 3, 0, 5, 0]" in result.stdout
        assert "0.00e+00" in result.stdout  # packed equals separate, exactly here
    else:
        assert "mtp_3 loss" in result.stdout


@pytest.mark.parametrize("spec", ["custom_layer_spec.yaml", "deepseek_lambda_schedule.yaml"])
def test_example_specs_build(spec):
    result = run_mtp("build", f"examples/{spec}", "--json")
    assert result.returncode == 0, result.stderr
