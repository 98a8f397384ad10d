"""Safe, strict YAML reading that remembers where every key came from.

PyYAML's safe loader still follows YAML 1.1, where `yes` is a boolean, `010` is octal and `1e30`
is a string. Specs use the YAML 1.2 core schema instead: `true`/`false`, decimal integers,
floats with or without a dot (`1e-5`, `10e12`), and `.nan`/`.inf` rejected outright. Duplicate
keys, Python tags and anything but a mapping at the top are errors with a file:line:column.
"""

from __future__ import annotations

import math
import re
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


def _index_positions(
    node: yaml.Node, path: KeyPath, marks: dict[KeyPath, Mark], source: str
) -> list[Problem]:
    """Record where each key sits and find duplicate keys (PyYAML keeps the last silently)."""
    problems: list[Problem] = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, Mark] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else repr(key_node)
            child = (*path, key)
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


def parse_yaml_text(text: str, source: str) -> YamlDocument:
    """Parse one YAML document that must be a mapping; every failure is a located SpecError."""
    loader = StrictSafeLoader(text)
    try:
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
    finally:
        loader.dispose()
    return YamlDocument(data=data, source=source, key_marks=marks)


def read_yaml_file(path: str | Path) -> YamlDocument:
    """Read and parse a spec file, turning I/O failures into located SpecErrors."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(problems=[Problem("no such file", file=str(path))]) from None
    except IsADirectoryError:
        raise SpecError(problems=[Problem("is a directory, expected a YAML file",
                                          file=str(path))]) from None
    except (OSError, UnicodeDecodeError) as error:
        raise SpecError(problems=[Problem(f"cannot read: {error}", file=str(path))]) from None
    return parse_yaml_text(text, str(path))


def parse_scalar(text: str) -> Any:
    """Type an override's right-hand side the way the same text would read in the spec."""
    if text.strip() == "":
        return None
    return parse_yaml_text(f"value: {text}", "<override>").data["value"]
