"""`load_spec`: YAML file (or mapping) + `key=value` overrides -> validated `RunSpec`.

Every failure is a `SpecError` listing each problem with the file, line, column and dotted key
path, what was expected, and the nearest valid key when a name looks like a typo.
"""

from __future__ import annotations

import copy
import difflib
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
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


def edit_distance(a: str, b: str) -> int:
    """Edits (insert, delete, substitute, swap two neighbours) that turn `a` into `b`: `modle`
    is one swap from `model` but two edits from `modules`, which difflib ranks first."""
    previous2: list[int] = []
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i] + [0] * len(b)
        for j, cb in enumerate(b, start=1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                current[j] = min(current[j], previous2[j - 2] + 1)
        previous2, previous = previous, current
    return previous[-1]


def suggest_key(path: KeyPath, below: KeyPath = ()) -> str | None:
    """'did you mean ...' for an unknown key, from the keys valid at that place.

    `below` is what an override sets under the unknown key (`hidden_size` of
    `modle.hidden_size=128`): a section that has it is the likelier meaning.
    """
    parent = _model_class_at(path[:-1])
    if parent is None or not isinstance(path[-1], str):
        return None
    typo = path[-1]

    def rank(name: str) -> tuple[int, int, float]:
        fits = 0 if below and _model_class_at((*path[:-1], name, *below[:-1])) is not None \
            and _holds_key((*path[:-1], name), below) else 1
        ratio = difflib.SequenceMatcher(None, typo, name).ratio()
        return edit_distance(typo, name), fits, -ratio

    names = list(parent.model_fields)
    best = min(names, key=rank)
    distance = rank(best)[0]
    if distance <= max(1, len(typo) // 3) or difflib.get_close_matches(typo, [best], cutoff=0.6):
        return f"did you mean '{best}'?"
    return f"valid keys here: {', '.join(names)}"


def _holds_key(section: KeyPath, below: KeyPath) -> bool:
    """Whether the mapping at `section` has the key `below[0]` (the first step of `below`)."""
    model = _model_class_at(section)
    return model is not None and isinstance(below[0], str) and below[0] in model.model_fields


def _dotted(path: Iterable[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _error_path(error: Mapping[str, Any]) -> tuple[KeyPath, str | None, KeyPath]:
    """(key path, union branch tag, key path of the union field) of one Pydantic error.

    Pydantic puts the branch of a union (`constrained-float`, `list[LossWeightStep]`) into the
    location; a part that is neither an index nor a key of the model at that place is such a
    tag, and is dropped from the key path people see.
    """
    loc: list[str | int] = []
    branch: str | None = None
    union_at: KeyPath = ()
    for part in error["loc"]:
        if isinstance(part, str) and branch is None and loc and _is_branch_tag(tuple(loc), part):
            branch, union_at = part, tuple(loc)
            continue
        loc.append(part)
    ctx = error.get("ctx") or {}
    if error["type"] == "spec_rule" and "field" in ctx:
        loc += str(ctx["field"]).split(".")  # the rule names a key relative to its section
    return tuple(loc), branch, union_at


def _is_branch_tag(path: KeyPath, part: str) -> bool:
    """`part` after `path` names a union branch, not a key."""
    parent = _model_class_at(path[:-1])
    if parent is None or not isinstance(path[-1], str) or path[-1] not in parent.model_fields:
        return False
    annotation = parent.model_fields[path[-1]].annotation
    if typing.get_origin(annotation) not in (types.UnionType, typing.Union):
        return False
    # `X | None` is validated as a nullable X, without a tag; a real union tags its branches
    return len([a for a in typing.get_args(annotation) if a is not type(None)]) > 1


# What each Pydantic error type means, in the words of a YAML file.
_EXPECTED = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "bool_type": "a boolean (true or false)",
    "bool_parsing": "a boolean (true or false)", "string_type": "a string",
    "dict_type": "a mapping (key: value lines)", "model_type": "a mapping (key: value lines)",
    "model_attributes_type": "a mapping (key: value lines)", "list_type": "a list",
    "finite_number": "a finite number",
}
_BRANCH_NAMES = {"list": "a list of steps", "float": "a number", "int": "an integer",
                 "str": "a string", "bool": "a boolean (true or false)"}


def _yaml_value(value: Any) -> str:
    """A value as YAML would write it (`true`, `null`, `'abc'`), for 'got ...'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value[:60] + ("..." if len(value) > 60 else ""))
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = str(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} digits)"


def _message(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind == "spec_rule":
        return str(error["ctx"]["message"])
    got = f" (got {_yaml_value(error.get('input'))})" if "input" in error else ""
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}{got}"
    if kind == "literal_error":
        options = str((error.get("ctx") or {}).get("expected", ""))
        options = re.sub(r"\bTrue\b", "true", re.sub(r"\bFalse\b", "false", options))
        return f"expected one of {options}{got}"
    text = str(error["msg"])
    text = re.sub(r"^(Input|Value) should be ", "must be ", text)
    return f"{text[:1].lower()}{text[1:]}{got}"


def _branch_name(tag: str) -> str:
    base = re.split(r"[\[-]", tag.replace("constrained-", ""))[0]
    return _BRANCH_NAMES.get(base, base)


def _merge_union_errors(errors: list[Mapping[str, Any]]
                        ) -> list[tuple[KeyPath, str, Mapping[str, Any]]]:
    """(path, message, error) per problem. For a union field (a number or a list of steps), a
    branch whose errors lie deeper than the field matched the value's shape: only its errors
    count; when none does, one message lists what the field takes."""
    out: list[tuple[KeyPath, str, Mapping[str, Any]]] = []
    unions: dict[KeyPath, list[tuple[str, KeyPath, Mapping[str, Any]]]] = {}
    for error in errors:
        path, branch, union_at = _error_path(error)
        if branch is None:
            out.append((path, _message(error), error))
        else:
            unions.setdefault(union_at, []).append((branch, path, error))
    for union_at, items in unions.items():
        deeper = [(path, error) for _, path, error in items if len(path) > len(union_at)]
        if deeper:
            out += [(path, _message(error), error) for path, error in deeper]
            continue
        right_type = [error for _, _, error in items if error["type"] not in _EXPECTED]
        if right_type:  # e.g. a number, but negative: that branch's bound is the news
            out += [(union_at, _message(error), error) for error in right_type]
            continue
        wanted = " or ".join(dict.fromkeys(_branch_name(branch) for branch, _, _ in items))
        got = items[0][2].get("input")
        out.append((union_at, f"expected {wanted} (got {_yaml_value(got)})", items[0][2]))
    return out


def _override_for(path: KeyPath, overrides: Mapping[KeyPath, str]) -> tuple[KeyPath, str] | None:
    """The override that set `path`, or set something below it (`modle` of `modle.x=1`)."""
    for opath, text in overrides.items():
        shorter = min(len(path), len(opath))
        if shorter and path[:shorter] == opath[:shorter]:
            return opath, text
    return None


def _problems_from_validation(
    error: ValidationError, document: YamlDocument | None, overrides: Mapping[KeyPath, str]
) -> list[Problem]:
    problems: list[Problem] = []
    seen: set[tuple[KeyPath, str]] = set()
    for path, message, item in _merge_union_errors(error.errors()):
        if (path, message) in seen:
            continue
        seen.add((path, message))
        found = _override_for(path, overrides)
        if found is not None:
            opath, text = found
            hint = suggest_key(path, opath[len(path):]) if item["type"] == "extra_forbidden" \
                else None
            problems.append(Problem(message, file=f"override '{text}'", key=_dotted(path),
                                    hint=hint))
            continue
        hint = suggest_key(path) if item["type"] == "extra_forbidden" else None
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


@dataclass(frozen=True)
class SpecSource:
    """Where a spec came from: its YAML document (None for a mapping) and the overrides applied,
    so that a problem found later, by key, can name its file and line."""

    document: YamlDocument | None
    overrides: Mapping[KeyPath, str]


def locate_problems(problems: list[Problem], source: SpecSource | None) -> list[Problem]:
    """Attach file:line (or the override) to problems that carry only a key path."""
    document = source.document if source else None
    overrides = source.overrides if source else {}
    located = []
    for problem in problems:
        path: KeyPath = tuple(problem.key.split(".")) if problem.key else ()
        found = _override_for(path, overrides)
        if found is not None:
            located.append(Problem(problem.message, f"override '{found[1]}'", None, None,
                                   problem.key, problem.hint))
            continue
        mark = document.mark_for(path) if document else None
        located.append(Problem(
            problem.message, document.source if document else problem.file,
            mark.line if mark else None, mark.column if mark else None, problem.key,
            problem.hint,
        ))
    return located


# The rules a spec must pass beyond its schema, installed by the floors that own them (the
# package's `__init__` installs `mtp_cli.plan.rules.check_spec` and the module-tree check of
# `mtp_cli.builders`): config imports neither. Each raises `SpecError` with problems by key.
SpecCheck = Callable[[RunSpec, bool], None]
_SPEC_CHECKS: list[SpecCheck] = []


def add_spec_check(check: SpecCheck) -> None:
    """Run `check(spec, allow_imports)` on every spec `load_spec` loads, after those added
    before it."""
    if check not in _SPEC_CHECKS:
        _SPEC_CHECKS.append(check)


def load_spec(
    path_or_mapping: str | Path | Mapping[str, Any],
    overrides: Iterable[str] = (),
    *,
    allow_imports: bool = False,
) -> RunSpec:
    """Load, override and validate a run spec: its schema, then every check `add_spec_check`
    installed (the spec's rules, its module trees). Raises `SpecError` with located problems.

    `allow_imports` permits `import:package.module:Class` modules in the `modules` section;
    without it such a spec is rejected (nothing is imported while loading either way).
    """
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
    spec._source = SpecSource(document, applied)
    if not _SPEC_CHECKS:
        raise RuntimeError("no spec rules installed: import mtp_cli (its __init__ adds them)")
    for check in _SPEC_CHECKS:
        try:
            check(spec, allow_imports)
        except SpecError as error:
            raise SpecError(problems=locate_problems(error.problems, spec.source)) from None
    return spec
