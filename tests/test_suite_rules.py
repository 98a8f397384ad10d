"""The suite's own rules: a fast test that starts a process fails (conftest's tier rule), and
no test module imports from another one (shared helpers live in helper modules)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def test_a_fast_test_that_starts_a_process_fails_naming_itself():
    with pytest.raises(pytest.fail.Exception, match=r"test_suite_rules\.py::.* starts a process"):
        subprocess.run([sys.executable, "-c", "pass"], check=False)


def test_no_test_module_imports_from_another():
    offenders = []
    for path in sorted(TESTS.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
            offenders += [f"{path.name}:{node.lineno} {name}" for name in names
                          if name.startswith(("tests.test_", "test_"))]
    assert offenders == []
