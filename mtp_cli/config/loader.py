"""`load_spec`: YAML file (or mapping) + `key=value` overrides -> validated `RunSpec`.

Every failure is a `SpecError` listing each problem with the file, line, column and dotted key
path, what was expected, and the nearest valid key when a name looks like a typo.
"""

from __future__ import annotations

import copy
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from mtp_cli.config.schema import RunSpec
from mtp_cli.config.yaml_source import KeyPath, YamlDocument, parse_scalar, read_yaml_file
from mtp_cli.errors import Problem, SpecError


def _model_class_at(path: KeyPath, root: type[BaseModel] = RunSpec) -> type[BaseModel] | None:
    """The Pydantic model that validates the mapping found at `path`, if any."""
    current: Any = root
    for part in path:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        if isinstance(part, int):
            continue
        info = current.model_fields.get(part)
        if info is None:
            return None
        current = _first_model(info.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _first_model(annotation: Any) -> Any:
    """Unwrap Optional / Annotated / list[...] down to the first BaseModel type inside."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin is None:
        return None
    for arg in typing.get_args(annotation):
        found = _first_model(arg)
        if found is not None:
            return found
    if origin in (types.UnionType, typing.Union):
        return None
    return None


def suggest_key(path: KeyPath) -> str | None:
    """'did you mean ...' for an unknown key, from the keys valid at that place."""
    parent = _model_class_at(path[:-1])
    if parent is None or not isinstance(path[-1], str):
        return None
    close = difflib.get_close_matches(path[-1], list(parent.model_fields), n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    return f"valid keys here: {', '.join(parent.model_fields)}"


def _dotted(path: Iterable[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _error_path(error: Mapping[str, Any]) -> KeyPath:
    """The key path of one Pydantic error, with union/type tags dropped."""
    loc: list[str | int] = []
    for part in error["loc"]:
        if isinstance(part, str) and ("[" in part or part in ("float", "int", "list", "bool")):
            continue  # union branch tags such as 'list[LossWeightStep]'
        loc.append(part)
    ctx = error.get("ctx") or {}
    if error["type"] == "spec_rule" and "field" in ctx:
        loc += str(ctx["field"]).split(".")  # the rule names a key relative to its section
    return tuple(loc)


def _message(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind == "spec_rule":
        return str(error["ctx"]["message"])
    got = error.get("input")
    shown = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
    text = str(error["msg"])
    return f"{text[:1].lower()}{text[1:]}{shown}"


def _problems_from_validation(
    error: ValidationError, document: YamlDocument | None, overrides: Mapping[KeyPath, str]
) -> list[Problem]:
    problems: list[Problem] = []
    seen: set[tuple[KeyPath, str]] = set()
    for item in error.errors():
        path = _error_path(item)
        message = _message(item)
        if (path, message) in seen:
            continue
        seen.add((path, message))
        hint = suggest_key(path) if item["type"] == "extra_forbidden" else None
        override = next(
            (text for opath, text in overrides.items() if path[: len(opath)] == opath), None
        )
        if override is not None:
            problems.append(Problem(message, file=f"override '{override}'", key=_dotted(path),
                                    hint=hint))
            continue
        mark = document.mark_for(path) if document else None
        problems.append(Problem(
            message,
            file=document.source if document else None,
            line=mark.line if mark else None,
            column=mark.column if mark else None,
            key=_dotted(path) or None,
            hint=hint,
        ))
    return problems


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[KeyPath, str]:
    """Apply `a.b.c=value` overrides in place; returns which path each override set."""
    applied: dict[KeyPath, str] = {}
    for text in overrides:
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise SpecError(problems=[Problem(
                "expected KEY=VALUE with a dotted key, e.g. mtp.num_layers=2",
                file=f"override '{text}'",
            )])
        path = tuple(key.split("."))
        try:
            value = parse_scalar(raw)
        except SpecError as error:
            raise SpecError(problems=[Problem(p.message, file=f"override '{text}'", key=key)
                                      for p in error.problems]) from None
        node = data
        for depth, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise SpecError(problems=[Problem(
                    f"'{_dotted(path[: depth + 1])}' is a value, not a section",
                    file=f"override '{text}'", key=key,
                )])
            node = child
        node[path[-1]] = value
        applied[path] = text
    return applied


def _locate(problems: list[Problem], document: YamlDocument | None,
            overrides: Mapping[KeyPath, str]) -> list[Problem]:
    """Attach file:line (or the override) to problems that carry only a key path."""
    located = []
    for problem in problems:
        path: KeyPath = tuple(problem.key.split(".")) if problem.key else ()
        override = next(
            (text for opath, text in overrides.items() if path[: len(opath)] == opath), None
        )
        if override is not None:
            located.append(Problem(problem.message, f"override '{override}'", None, None,
                                   problem.key, problem.hint))
            continue
        mark = document.mark_for(path) if document else None
        located.append(Problem(
            problem.message, document.source if document else problem.file,
            mark.line if mark else None, mark.column if mark else None, problem.key,
            problem.hint,
        ))
    return located


def load_spec(
    path_or_mapping: str | Path | Mapping[str, Any],
    overrides: Iterable[str] = (),
    *,
    allow_imports: bool = False,
) -> RunSpec:
    """Load, override and validate a run spec. Raises `SpecError` with located problems.

    `allow_imports` permits `import:package.module:Class` modules in the `modules` section;
    without it such a spec is rejected (nothing is imported while loading either way).
    """
    from mtp_cli.build.module_trees import parse_module_trees

    document: YamlDocument | None = None
    if isinstance(path_or_mapping, Mapping):
        data = copy.deepcopy(dict(path_or_mapping))
    else:
        document = read_yaml_file(path_or_mapping)
        data = copy.deepcopy(document.data)
    applied = apply_overrides(data, overrides)
    try:
        spec = RunSpec.model_validate(data)
    except ValidationError as error:
        raise SpecError(problems=_problems_from_validation(error, document, applied)) from None
    try:
        parse_module_trees(spec, allow_imports=allow_imports)
    except SpecError as error:
        raise SpecError(problems=_locate(error.problems, document, applied)) from None
    return spec
