"""One owner of process groups: `parallel/mesh.py` makes every group, the launcher's
`launch/distributed.py` the default one, and training takes its fault points and its process
description as arguments, never from the launcher (read from the package's syntax trees)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from mtp_cli.launch.faults import EnvFaults
from mtp_cli.train.faults import NO_FAULTS

PACKAGE = Path(__file__).resolve().parents[1] / "mtp_cli"
GROUP_MAKERS = {"new_group", "init_device_mesh", "DeviceMesh", "mesh._flatten"}
DEFAULT_GROUP = {"init_process_group", "destroy_process_group"}


def _calls(path: Path, names: set[str]) -> list[str]:
    """`file:line name` of every call of a function or method named in `names` (`mesh.NAME`:
    a method of that name on anything but a bare name: `mesh["dp", "cp"]._flatten(...)`)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if isinstance(func, ast.Attribute) and f"mesh.{name}" in names:
                name = f"mesh.{name}"
            if name in names:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {name}")
    return found


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    return modules


def test_process_groups_are_made_in_the_mesh_module_only():
    where = {Path(x.split(":")[0]).as_posix()
             for path in PACKAGE.rglob("*.py") for x in _calls(path, GROUP_MAKERS)}
    assert where == {"mtp_cli/parallel/mesh.py"}  # and the walk does find the mesh's own calls


def test_the_default_group_is_initialised_by_the_launchers_entry_only():
    where = {Path(x.split(":")[0]).as_posix()
             for path in PACKAGE.rglob("*.py") for x in _calls(path, DEFAULT_GROUP)}
    assert where == {"mtp_cli/launch/distributed.py"}


def test_training_imports_nothing_from_the_launcher():
    offenders = {f"{path.name}: {module}" for path in (PACKAGE / "train").rglob("*.py")
                 for module in _imports(path) if module.startswith("mtp_cli.launch")}
    assert offenders == set()


def _chunks_with_gradients() -> list[torch.nn.Module]:
    layer = torch.nn.Linear(3, 2)
    layer(torch.ones(1, 3)).sum().backward()
    return [layer]


def test_the_default_fault_points_do_nothing(monkeypatch):
    monkeypatch.setenv("MTP_TEST_NONFINITE_AT_STEP", "2")  # only the worker's EnvFaults read it
    chunks = _chunks_with_gradients()
    NO_FAULTS.corrupt_gradients(2, chunks)
    NO_FAULTS.disk_full(2, 0)
    assert all(torch.isfinite(p.grad).all() for p in chunks[0].parameters())


@pytest.mark.parametrize(("value", "step", "corrupted"), [
    ("2", 2, True), ("2", 3, False), ("2,3,4", 3, True), ("12", 2, False), ("", 2, False)])
def test_the_nonfinite_fault_point_fills_the_named_steps_gradients_with_inf(
        monkeypatch, value, step, corrupted):
    monkeypatch.setenv("MTP_TEST_NONFINITE_AT_STEP", value)
    chunks = _chunks_with_gradients()
    EnvFaults().corrupt_gradients(step, chunks)
    grads = [p.grad for p in chunks[0].parameters()]
    if corrupted:
        assert all(torch.isinf(g).all() for g in grads)
    else:
        assert all(torch.isfinite(g).all() for g in grads)
