"""The spec's rules and derived facts have one owner: `mtp_cli.plan` (read from the syntax trees).

Code outside `config/` and `plan/` asks the plan (`RunPlan.depths`, `mtp_depths`, a stage's
`mtp_layers`) for the MTP depths instead of reading `spec.mtp.num_layers`, and the floors that
hold the spec's schema and rules import nothing above them, lazily or not.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mtp_cli"

# One raw read may stay, with its reason.
ALLOWED_READS = {
    # GPTModel takes the MTP architecture (MTPConfig) itself, not a spec: built alone, with no
    # stage given, it holds every layer, and its MTP config is the only place D is written.
    "gpt/model.py": 1,
}


def _modules(folder: Path = PACKAGE) -> dict[str, ast.Module]:
    return {path.relative_to(PACKAGE).as_posix(): ast.parse(path.read_text())
            for path in sorted(folder.rglob("*.py"))}


def raw_depth_reads(tree: ast.AST) -> list[int]:
    """Lines reading `<x>.mtp.num_layers` or `mtp.num_layers` (an MTP config held as `mtp`)."""
    lines = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and node.attr == "num_layers"
                and isinstance(node.ctx, ast.Load)):
            continue
        owner = node.value
        if (isinstance(owner, ast.Attribute) and owner.attr == "mtp") or \
                (isinstance(owner, ast.Name) and owner.id == "mtp"):
            lines.append(node.lineno)
    return lines


def test_raw_depth_reads_are_counted_in_syntax_not_text():
    tree = ast.parse("a = spec.mtp.num_layers\nb = mtp.num_layers\nc = spec.model.num_layers\n"
                     "d = 'spec.mtp.num_layers'\nspec.mtp.num_layers = 2\n")
    assert raw_depth_reads(tree) == [1, 2]


def test_nothing_outside_config_and_plan_reads_the_mtp_depths_from_the_spec():
    found = {name: raw_depth_reads(tree) for name, tree in _modules().items()
             if not name.startswith(("config/", "plan/"))}
    counts = {name: len(lines) for name, lines in found.items() if lines}
    assert counts == ALLOWED_READS, {name: found[name] for name in counts}


def _imported_folders(tree: ast.AST) -> set[str]:
    """The `mtp_cli` folders (or top-level modules) a module imports, function bodies included."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name.split(".")[1] for name in names
            if name.startswith("mtp_cli.") and name.count(".") >= 1}


def test_the_spec_floors_import_nothing_above_them():
    """config (schema, loader) imports only errors; plan (rules, placement, memory arithmetic)
    only errors and config: the rules run where specs are loaded, installed from above."""
    allowed = {"config": {"config", "errors"}, "plan": {"plan", "config", "errors"}}
    for folder, may_import in allowed.items():
        for name, tree in _modules(PACKAGE / folder).items():
            above = _imported_folders(tree) - may_import
            assert not above, f"mtp_cli/{folder}/{name} imports {sorted(above)}"
