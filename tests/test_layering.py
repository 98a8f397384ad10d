"""Folders import only the folders below them, in the order README's "Layout" lists them.

The graph is read from the syntax trees of `mtp_cli/`, so nothing hides from it: imports at the
top of a file, imports inside functions (the lazy ones that used to dodge loops), relative
imports, `from mtp_cli import checkpoint`, and string constants naming a module
(`"mtp_cli.parallel.comm"`, what `importlib` would load). The order is parsed from README's
Layout block, so the README and this test cannot drift apart.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mtp_cli"
MODULE_NAME = re.compile(r"mtp_cli(\.[A-Za-z_]\w*)+")
LAYOUT_ENTRY = re.compile(r"^  ([A-Za-z_]\w*)(/|\.py)(\s|$)")

def node_of(module: str) -> str | None:
    """The layout entry a dotted module belongs to: its top-level folder or file under mtp_cli
    (`mtp_cli.__main__` is the command, so `cli`; the package root is `__init__`)."""
    parts = module.split(".")
    if parts[0] != "mtp_cli":
        return None
    if len(parts) == 1:
        return "__init__"
    return "cli" if parts[1] == "__main__" else parts[1]


@cache
def is_module(dotted: str) -> bool:
    """Whether `dotted` names a module or package of this tree."""
    path = ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


@cache
def root_constants() -> frozenset[str]:
    """Names the package root binds before its first import: any floor may read them
    (`__version__`); every `mtp_cli.*` import runs the root first anyway, and these names are
    bound before the root imports anything."""
    names: set[str] = set()
    for node in ast.parse((PACKAGE / "__init__.py").read_text()).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            break
        if isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return frozenset(names)


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[str, int]]:
    """(dotted module, line) for every import and module-naming string in `source`."""
    package = module if is_package else module.rpartition(".")[0]
    constants = root_constants()
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                if is_module(f"{base}.{alias.name}"):
                    found.append((f"{base}.{alias.name}", node.lineno))
                elif not (base == "mtp_cli" and alias.name in constants):
                    found.append((base, node.lineno))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and MODULE_NAME.fullmatch(node.value):
            found.append((node.value, node.lineno))
    return found


@cache
def import_graph() -> dict[tuple[str, str], list[str]]:
    """(importing entry, imported entry) -> the places ("file:line") that make the edge."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(ROOT).with_suffix("")
        is_package = relative.name == "__init__"
        module = ".".join(relative.parts[:-1] if is_package else relative.parts)
        source_node = node_of(module)
        for target, line in imported_modules(path.read_text(), module, is_package):
            target_node = node_of(target)
            if target_node is not None and target_node != source_node:
                edges[(source_node, target_node)].append(f"{relative}.py:{line}")
    return {edge: sorted(set(where)) for edge, where in edges.items()}


def layout_order(readme: str) -> list[str]:
    """The entries of README's Layout block, top (imported by everything) to bottom."""
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    return [m.group(1) for line in block.splitlines() if (m := LAYOUT_ENTRY.match(line))]


def upward_edges() -> dict[tuple[str, str], list[str]]:
    """Edges from an entry to one listed after it in the Layout (a floor importing a higher one)."""
    order = layout_order((ROOT / "README.md").read_text())
    rank = {name: index for index, name in enumerate(order)}
    return {edge: where for edge, where in import_graph().items()
            if rank[edge[1]] > rank[edge[0]]}


def cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """The strongly connected components with more than one entry (Tarjan)."""
    graph: dict[str, list[str]] = defaultdict(list)
    for source, target in edges:
        graph[source].append(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(set(graph) | {t for _, t in edges}):
        if node not in index:
            visit(node)
    return found


# --- the graph reader sees every kind of import ---------------------------------------------
def test_the_reader_sees_lazy_relative_from_root_and_string_imports():
    source = '''
import mtp_cli.config.schema
from . import block
from ..models import linear
from mtp_cli import checkpoint, __version__
def later():
    from mtp_cli.builders.model_builder import build_model
MODULE = "mtp_cli.parallel.comm"
MESSAGE = "import mtp_cli.parallel.comm first"
'''
    found = {name for name, _ in imported_modules(source, "mtp_cli.mtp.layer", False)}
    assert found == {"mtp_cli.config.schema", "mtp_cli.mtp.block", "mtp_cli.models.linear",
                     "mtp_cli.checkpoint", "mtp_cli.builders.model_builder",
                     "mtp_cli.parallel.comm"}


def test_the_cycle_finder_finds_loops_and_only_loops():
    assert cycles({("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")}) == [["a", "b", "c"]]
    assert cycles({("a", "b"), ("b", "c"), ("a", "c")}) == []


# --- README's Layout is the order --------------------------------------------------------------
def test_layout_lists_every_folder_and_top_level_module_once():
    order = layout_order((ROOT / "README.md").read_text())
    entries = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    entries |= {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__main__"}
    assert sorted(order) == sorted(entries)
    assert len(order) == len(set(order))


def test_parallel_imports_no_mtp_module():
    """Sharding rules are declared beside the modules; parallel/ applies them by name."""
    assert [where for edge, where in import_graph().items() if edge == ("parallel", "mtp")] == []


def test_imports_follow_the_layout_order():
    assert upward_edges() == {}


def test_folder_import_graph_is_acyclic():
    assert cycles(set(import_graph())) == []
