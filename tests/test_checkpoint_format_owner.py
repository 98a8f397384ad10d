"""`mtp_cli/checkpoint/` is the one owner of the on-disk format: no other module spells
`meta.json`, `latest` or `checkpoints` in code.

The rule, applied to every string constant of every module outside `mtp_cli/checkpoint/` (the
literal parts of f-strings included):
- a constant *names the format* when one of its `/`-separated parts is exactly `meta.json`,
  `latest` or `checkpoints` (so `"checkpoints"`, `"checkpoints/latest"`, `f"{run}/meta.json"`);
- it is allowed as *text for people*: a docstring (any bare string statement), a constant that
  holds whitespace (prose, never a path component here), or the literal text of a message: the
  string (or an f-string's literal parts, or a `+` of them) passed positionally to a message
  call (`UserError`, `Problem`, `print`, `echo`, `warn`, ...) or as `help=`, `hint=`,
  `description=`, `message=`. Only the literal text is allowed: an expression inside such an
  f-string or argument (`f"{path / 'meta.json'}"`, `file=str(p / "meta.json")`) is code.
Everything else - a path join, an `open`, a comparison, an argument, a return value - is code
and fails the test: ask `mtp_cli.checkpoint.layout` or `RunDir` for the name or the path.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mtp_cli"
OWNER = PACKAGE / "checkpoint"
NAMES = frozenset({"meta.json", "latest", "checkpoints"})
MESSAGE_CALLS = frozenset({"UserError", "Problem", "SpecError", "CheckpointFileError", "print",
                           "echo", "secho", "warn", "warning", "info", "error", "note", "Exit",
                           "BadParameter", "Option", "Argument", "append"})
MESSAGE_KEYWORDS = frozenset({"help", "hint", "description", "message", "reason"})


def _names_the_format(text: str) -> bool:
    if any(c.isspace() for c in text):
        return False
    return any(part in NAMES for part in text.split("/"))


def _call_name(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _literal_text(node: ast.AST) -> list[ast.Constant]:
    """The string constants that are the literal text of message expression `node`."""
    if isinstance(node, ast.Constant):
        return [node]
    if isinstance(node, ast.JoinedStr):
        return [v for v in node.values if isinstance(v, ast.Constant)]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _literal_text(node.left) + _literal_text(node.right)
    return []


def _allowed_constants(tree: ast.AST) -> set[int]:
    """ids of the constants that are text for people (see the module docstring)."""
    allowed: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            allowed.add(id(node.value))  # a docstring or a bare string statement
        if isinstance(node, ast.Call):
            messages = [kw.value for kw in node.keywords if kw.arg in MESSAGE_KEYWORDS]
            if _call_name(node) in MESSAGE_CALLS:
                messages += node.args
            allowed.update(id(c) for m in messages for c in _literal_text(m))
    return allowed


def offences(source: str, filename: str) -> list[str]:
    """`file:line: 'constant'` for each format name spelled in code in `source`."""
    tree = ast.parse(source, filename)
    allowed = _allowed_constants(tree)
    return [f"{filename}:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in allowed and _names_the_format(node.value)]


def test_no_module_outside_the_checkpoint_package_spells_the_format():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if OWNER in path.parents:
            continue
        found += offences(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE)))
    assert not found, "format names in code outside mtp_cli/checkpoint/:\n" + "\n".join(found)


@pytest.mark.parametrize("code", [
    'path = run_dir / "checkpoints"',
    'open(directory / "meta.json")',
    'if p.name == "latest": pass',
    'marker = f"{root}/checkpoints/latest"',
    'raise UserError(problems=[Problem("bad", file=str(p / "meta.json"))])',
    'raise UserError(f"{path / \'meta.json\'} is damaged")',
    'return stored, "meta.json"',
])
def test_code_that_spells_the_format_is_found(code):
    assert len(offences(code, "x.py")) == 1


@pytest.mark.parametrize("code", [
    'def f():\n    """Reads checkpoints/latest and meta.json."""',
    'raise UserError("stores no spec (no meta.json with one)")',
    'Problem(f"{path}: latest checkpoint {name}")',
    'typer.Option(None, help="checkpoints")',
    'note = f"no {META_JSON} here"',
    'x = "latest.tmp"',
])
def test_text_for_people_may_name_it(code):
    assert offences(code, "x.py") == []
