"""Safe, strict YAML reading that remembers where every key came from.

PyYAML's safe loader still follows YAML 1.1, where `yes` is a boolean, `010` is octal and `1e30`
is a string. Specs use the YAML 1.2 core schema instead: `true`/`false`, decimal integers,
floats with or without a dot (`1e-5`, `10e12`), and `.nan`/`.inf` rejected outright. Duplicate
keys, tags (`!!python/...`, `!!timestamp`, ...) and anything but a mapping at the top are errors
with a file:line:column and the key path.

Bounded on hostile input: a spec file must be a regular file of at most `MAX_SPEC_BYTES` (a FIFO
would block, `/dev/zero` never ends), and aliases may not expand the document past
`MAX_EXPANDED_NODES` nodes. PyYAML shares an aliased node instead of copying it, so a "billion
laughs" file is small when parsed, but everything that walks it as a tree (validation, the
key index, a deep copy) would visit every expanded node.
"""

from __future__ import annotations

import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml

from mtp_cli.errors import Problem, SpecError

KeyPath = tuple[str | int, ...]

_INT = re.compile(r"^[-+]?(0|[1-9][0-9_]*|0x[0-9a-fA-F_]+|0o[0-7_]+)$")
_FLOAT = re.compile(
    r"^[-+]?(\.[0-9]+|[0-9][0-9_]*(\.[0-9_]*)?)([eE][-+]?[0-9]+)?$"
    r"|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$"
)
_BOOL = re.compile(r"^(true|True|TRUE|false|False|FALSE)$")
_NULL = re.compile(r"^(~|null|Null|NULL|)$")
_NON_FINITE = re.compile(r"^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$")
PLAIN_TAGS = frozenset(f"tag:yaml.org,2002:{name}"
                       for name in ("str", "int", "float", "bool", "null", "map", "seq"))
MAX_SPEC_BYTES = 8 * 2**20
MAX_EXPANDED_NODES = 100_000
MAX_DEPTH = 64  # nesting of lists and mappings; a spec needs about ten


class StrictSafeLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core scalars (no YAML 1.1 `yes`/octal surprises)."""

    yaml_implicit_resolvers: ClassVar[dict[str, list[tuple[str, re.Pattern[str]]]]] = {}


for _tag, _regex, _first in (
    ("tag:yaml.org,2002:bool", _BOOL, "tTfF"),
    ("tag:yaml.org,2002:int", _INT, "-+0123456789"),
    ("tag:yaml.org,2002:float", _FLOAT, "-+0123456789."),
    ("tag:yaml.org,2002:null", _NULL, ["~", "n", "N", ""]),
):
    StrictSafeLoader.add_implicit_resolver(_tag, _regex, list(_first))


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    sign = -1 if text.startswith("-") else 1
    text = text.lstrip("+-")
    if text.startswith("0x"):
        return sign * int(text[2:], 16)
    if text.startswith("0o"):
        return sign * int(text[2:], 8)
    return sign * int(text)


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    text = loader.construct_scalar(node).replace("_", "")
    value = float(text.replace(".inf", "inf").replace(".Inf", "inf").replace(".INF", "inf")
                  .replace(".nan", "nan").replace(".NaN", "nan").replace(".NAN", "nan"))
    if not math.isfinite(value):
        raise SpecError(problems=[Problem(
            f"non-finite number {text!r} is not allowed", line=node.start_mark.line + 1,
            column=node.start_mark.column + 1,
        )])
    return value


StrictSafeLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
StrictSafeLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)


@dataclass(frozen=True)
class Mark:
    line: int  # 1-based
    column: int  # 1-based


@dataclass
class YamlDocument:
    """A parsed YAML mapping plus the position of every key and value in its source."""

    data: dict[str, Any]
    source: str
    key_marks: dict[KeyPath, Mark]

    def mark_for(self, path: KeyPath) -> Mark | None:
        """Where `path` (or its nearest present ancestor) was written."""
        for end in range(len(path), 0, -1):
            mark = self.key_marks.get(tuple(path[:end]))
            if mark is not None:
                return mark
        return None


def _mark(node: yaml.Node) -> Mark:
    return Mark(node.start_mark.line + 1, node.start_mark.column + 1)


def _dotted_path(path: KeyPath) -> str | None:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def _value_problem(node: yaml.Node, path: KeyPath, source: str) -> Problem | None:
    """A tag that builds something other than plain data, or a non-finite number."""
    where = {"file": source, "line": _mark(node).line, "column": _mark(node).column,
             "key": _dotted_path(path)}
    if node.tag not in PLAIN_TAGS:
        tag = node.tag.replace("tag:yaml.org,2002:", "!!")
        return Problem(f"tag {tag!r} is not allowed: only plain YAML (strings, numbers, "
                       "true/false, null, lists and mappings; no tags that build objects)",
                       **where)
    if not isinstance(node, yaml.ScalarNode):
        return None
    kind = node.tag.removeprefix("tag:yaml.org,2002:")
    pattern = {"int": _INT, "float": _FLOAT, "bool": _BOOL}.get(kind)
    if pattern is not None and not pattern.match(node.value):  # an explicit !!int abc
        return Problem(f"{node.value[:40]!r} is not a valid {kind}", **where)
    if kind == "float":
        text = node.value.replace("_", "")
        if _NON_FINITE.match(text) or not math.isfinite(float(text)):
            return Problem(f"non-finite number {node.value!r} is not allowed", **where)
    return None


def expanded_size(root: yaml.Node, source: str, limit: int = MAX_EXPANDED_NODES) -> int:
    """Nodes in the document with every alias expanded (a shared node counts at each use).

    Counted over the node graph with memoisation, so a bomb is measured without expanding
    it; a cycle (`&a [*a]`) is an error.
    """
    sizes: dict[int, int] = {}
    depths: dict[int, int] = {}
    in_progress: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        children = _children(node)
        if children_done:
            in_progress.discard(id(node))
            sizes[id(node)] = min(1 + sum(sizes[id(c)] for c in children), limit + 1)
            depths[id(node)] = 1 + max((depths[id(c)] for c in children), default=0)
            if depths[id(node)] > MAX_DEPTH:
                raise SpecError(problems=[Problem(
                    f"lists and mappings nested more than {MAX_DEPTH} deep", file=source,
                    line=_mark(node).line, column=_mark(node).column)])
            continue
        if id(node) in in_progress:
            raise SpecError(problems=[Problem(
                "an alias refers to a node that contains it (a recursive structure)",
                file=source, line=_mark(node).line, column=_mark(node).column)])
        in_progress.add(id(node))
        stack.append((node, True))
        for child in children:
            if id(child) in in_progress:
                raise SpecError(problems=[Problem(
                    "an alias refers to a node that contains it (a recursive structure)",
                    file=source, line=_mark(child).line, column=_mark(child).column)])
            if id(child) not in sizes:
                stack.append((child, False))
    total = sizes[id(root)]
    if total > limit:
        raise SpecError(problems=[Problem(
            f"the document expands to more than {limit:,} values once its aliases (*name) are "
            "expanded; refusing to read it (an alias bomb?)", file=source)])
    return total


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [item for pair in node.value for item in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _index_positions(
    node: yaml.Node, path: KeyPath, marks: dict[KeyPath, Mark], source: str
) -> list[Problem]:
    """Record where each key sits and find duplicate keys (PyYAML keeps the last silently),
    tags and non-finite numbers, each with its key path."""
    problem = _value_problem(node, path, source)
    if problem is not None:
        return [problem]
    problems: list[Problem] = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, Mark] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else "<complex key>"
            child = (*path, key)
            if (problem := _value_problem(key_node, child, source)) is not None:
                problems.append(problem)
                continue
            if key in seen:
                first = seen[key]
                problems.append(Problem(
                    f"duplicate key {key!r} (first written at line {first.line})",
                    file=source, line=_mark(key_node).line, column=_mark(key_node).column,
                    key=".".join(map(str, child)),
                ))
                continue
            seen[key] = _mark(key_node)
            marks[child] = _mark(key_node)
            problems += _index_positions(value_node, child, marks, source)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            marks[(*path, index)] = _mark(item)
            problems += _index_positions(item, (*path, index), marks, source)
    return problems


def _check_nesting(text: str, source: str) -> None:
    """Refuse nesting past `MAX_DEPTH` from the event stream (an iterative pass), before the
    recursive composer would exhaust Python's stack on a `[[[[...` file."""
    depth = 0
    for event in yaml.parse(text, Loader=StrictSafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                mark = event.start_mark
                raise SpecError(problems=[Problem(
                    f"lists and mappings nested more than {MAX_DEPTH} deep", file=source,
                    line=mark.line + 1, column=mark.column + 1)])
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def parse_yaml_text(text: str, source: str) -> YamlDocument:
    """Parse one YAML document that must be a mapping; every failure is a located SpecError."""
    loader = StrictSafeLoader(text)
    try:
        _check_nesting(text, source)
        node = loader.get_single_node()
        if node is None:
            raise SpecError(problems=[Problem("the spec is empty: expected a mapping with a "
                                              "'model' section", file=source)])
        if not isinstance(node, yaml.MappingNode):
            kind = {yaml.SequenceNode: "a list", yaml.ScalarNode: "a single value"}[type(node)]
            raise SpecError(problems=[Problem(
                f"the top level is {kind}: expected a mapping of sections (model, mtp, ...)",
                file=source, line=_mark(node).line, column=_mark(node).column,
            )])
        expanded_size(node, source)
        marks: dict[KeyPath, Mark] = {}
        problems = _index_positions(node, (), marks, source)
        if problems:
            raise SpecError(problems=problems)
        data = loader.construct_document(node)
    except SpecError as error:
        raise SpecError(problems=[
            p if p.file else Problem(p.message, source, p.line, p.column, p.key, p.hint)
            for p in error.problems
        ]) from None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        message = error.problem or str(error)
        if "python/" in message or "could not determine a constructor" in message:
            message = f"{message}: only plain YAML is allowed (no tags that build objects)"
        raise SpecError(problems=[Problem(
            f"invalid YAML: {message}", file=source,
            line=mark.line + 1 if mark else None, column=mark.column + 1 if mark else None,
        )]) from None
    except yaml.YAMLError as error:
        raise SpecError(problems=[Problem(f"invalid YAML: {error}", file=source)]) from None
    except RecursionError:
        raise SpecError(problems=[Problem(
            f"lists and mappings nested too deeply (at most {MAX_DEPTH} levels)",
            file=source)]) from None
    finally:
        loader.dispose()
    return YamlDocument(data=data, source=source, key_marks=marks)


def read_yaml_file(path: str | Path) -> YamlDocument:
    """Read and parse a spec file, turning I/O failures into located SpecErrors."""
    path = Path(path)
    try:
        text = _read_regular_file(path, MAX_SPEC_BYTES).decode("utf-8")
    except FileNotFoundError:
        raise SpecError(problems=[Problem("no such file", file=str(path))]) from None
    except IsADirectoryError:
        raise SpecError(problems=[Problem("is a directory, expected a YAML file",
                                          file=str(path))]) from None
    except UnicodeDecodeError as error:
        raise SpecError(problems=[Problem(f"not UTF-8 text (byte {error.start})",
                                          file=str(path))]) from None
    except OSError as error:
        raise SpecError(problems=[Problem(f"cannot read: {error.strerror or error}",
                                          file=str(path))]) from None
    return parse_yaml_text(text, str(path))


class _NotRegular(OSError):
    pass


def _read_regular_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes`; never blocks on a FIFO or device."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(path)
        if not stat.S_ISREG(info.st_mode):
            raise _NotRegular(0, "not a regular file (a FIFO, device or socket)")
        if info.st_size > max_bytes:
            raise _NotRegular(0, f"{info.st_size:,} bytes, more than a spec may hold "
                                 f"({max_bytes:,})")
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = handle.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise _NotRegular(0, f"more than a spec may hold ({max_bytes:,} bytes)")
        return data
    finally:
        os.close(fd)


def parse_scalar(text: str) -> Any:
    """Type an override's right-hand side the way the same text would read in the spec."""
    if text.strip() == "":
        return None
    return parse_yaml_text(f"value: {text}", "<override>").data["value"]
