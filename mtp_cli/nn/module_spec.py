"""Megatron-style ModuleSpecs: which class builds each part of a layer, as data.

A `ModuleSpec(module, params, submodules)` names a module (a registered name such as
`TransformerLayer`, a backend slot such as `backend.layer_norm`, or - with an explicit opt-in -
`import:package.module:Class`), the keyword arguments it is built with, and the specs of its
children. Trees round-trip through plain dicts, so a spec file's `modules` section can swap any
part of a layer without touching the layer's code.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from mtp_cli.errors import Problem, SpecError, yaml_kind

BACKEND_SLOTS = ("layer_norm", "column_parallel_linear", "row_parallel_linear", "core_attention")
IMPORT_PREFIX = "import:"


@dataclass
class ModuleSpec:
    """What to build: `module` (name or class), its keyword `params`, its `submodules` specs."""

    module: str | type | Callable[..., nn.Module]
    params: dict[str, Any] = field(default_factory=dict)
    submodules: Any = None  # a submodules dataclass instance, a dict of specs, or None

    def to_dict(self) -> dict[str, Any]:
        """The YAML/JSON form: `{module: NAME, params: {...}, submodules: {...}}`."""
        out: dict[str, Any] = {"module": module_name(self.module)}
        if self.params:
            out["params"] = dict(self.params)
        children = submodule_items(self.submodules)
        if children:
            out["submodules"] = {
                name: child.to_dict() if isinstance(child, ModuleSpec) else module_name(child)
                for name, child in children.items()
                if child is not None
            }
            if isinstance(self.submodules, list | tuple):
                out["submodules"] = [c.to_dict() for c in self.submodules]
        return out


@dataclass(frozen=True)
class RegisteredModule:
    name: str
    factory: Callable[..., nn.Module]
    submodules_type: type | None  # dataclass listing the children this module builds


MODULE_REGISTRY: dict[str, RegisteredModule] = {}


def register_module(
    name: str | None = None, submodules: type | None = None
) -> Callable[[Any], Any]:
    """Class decorator: make a module nameable from spec files."""

    def wrap(factory: Any) -> Any:
        key = name or factory.__name__
        MODULE_REGISTRY[key] = RegisteredModule(key, factory, submodules)
        factory.spec_name = key
        return factory

    return wrap


def module_name(module: Any) -> str:
    if isinstance(module, str):
        return module
    registered = getattr(module, "spec_name", None)
    if registered and registered in MODULE_REGISTRY:
        return registered
    return f"{IMPORT_PREFIX}{module.__module__}:{module.__qualname__}"


def submodule_items(submodules: Any) -> dict[str, Any]:
    """Children of a spec as name -> spec, whatever container holds them."""
    if submodules is None:
        return {}
    if dataclasses.is_dataclass(submodules):
        return {f.name: getattr(submodules, f.name) for f in dataclasses.fields(submodules)}
    if isinstance(submodules, Mapping):
        return dict(submodules)
    if isinstance(submodules, list | tuple):
        return {str(i): s for i, s in enumerate(submodules)}
    raise TypeError(f"unsupported submodules container {type(submodules).__name__}")


class SpecTreeError(SpecError):
    """A `modules` tree that names something unknown or not allowed."""


def _problem(path: str, message: str, hint: str | None = None) -> SpecTreeError:
    return SpecTreeError(problems=[Problem(message, key=path, hint=hint)])


def parse_module_tree(tree: Any, path: str, *, allow_imports: bool) -> ModuleSpec:
    """Validate a `{module, params, submodules}` dict (or a bare name) into a ModuleSpec."""
    if isinstance(tree, str):
        tree = {"module": tree}
    if not isinstance(tree, Mapping):
        raise _problem(path, f"expected a module name or a mapping, got {yaml_kind(tree)}")
    unknown = set(tree) - {"module", "params", "submodules"}
    if unknown:
        key = sorted(unknown)[0]
        close = difflib.get_close_matches(key, ["module", "params", "submodules"], n=1)
        raise _problem(f"{path}.{key}", "unknown key",
                       f"did you mean '{close[0]}'?" if close else "use module/params/submodules")
    name = tree.get("module")
    if not isinstance(name, str) or not name:
        raise _problem(f"{path}.module", "expected a module name")
    params = tree.get("params") or {}
    if not isinstance(params, Mapping):
        raise _problem(f"{path}.params", "expected a mapping of keyword arguments")
    check_module_name(name, f"{path}.module", allow_imports=allow_imports)
    registered = MODULE_REGISTRY.get(name)
    raw_children = tree.get("submodules") or {}
    if not isinstance(raw_children, Mapping):
        raise _problem(f"{path}.submodules", "expected a mapping of submodule specs")
    children: dict[str, ModuleSpec] = {}
    allowed = (
        [f.name for f in dataclasses.fields(registered.submodules_type)]
        if registered and registered.submodules_type
        else None
    )
    for child_name, child_tree in raw_children.items():
        child_path = f"{path}.submodules.{child_name}"
        if allowed is not None and child_name not in allowed:
            close = difflib.get_close_matches(str(child_name), allowed, n=1)
            raise _problem(child_path, f"{name} has no submodule '{child_name}'",
                           f"did you mean '{close[0]}'?" if close else f"it has: {', '.join(allowed)}")
        children[child_name] = parse_module_tree(child_tree, child_path, allow_imports=allow_imports)
    return ModuleSpec(module=name, params=dict(params), submodules=children or None)


def check_module_name(name: str, path: str, *, allow_imports: bool) -> None:
    """A name must be registered, a backend slot, or an import the user opted in to."""
    if name.startswith("backend."):
        slot = name.removeprefix("backend.")
        if slot not in BACKEND_SLOTS:
            close = difflib.get_close_matches(slot, BACKEND_SLOTS, n=1)
            raise _problem(path, f"unknown backend slot '{name}'",
                           f"did you mean 'backend.{close[0]}'?" if close else
                           f"slots: {', '.join('backend.' + s for s in BACKEND_SLOTS)}")
        return
    if name.startswith(IMPORT_PREFIX):
        if not allow_imports:
            raise _problem(path, f"'{name}' imports code from outside mtp-cli",
                           "pass --allow-imports (Python: allow_imports=True) to permit it")
        target = name.removeprefix(IMPORT_PREFIX)
        if target.count(":") != 1 or not all(target.split(":")):
            raise _problem(path, f"malformed import '{name}'", "use import:package.module:Class")
        return
    if name not in MODULE_REGISTRY:
        close = difflib.get_close_matches(name, list(MODULE_REGISTRY), n=1)
        raise _problem(path, f"unknown module '{name}'",
                       f"did you mean '{close[0]}'?" if close else
                       "name a registered module or use import:package.module:Class")


def import_module_target(name: str) -> Any:
    """Import `import:package.module:Class` (only reached after the user opted in)."""
    module_path, _, attr = name.removeprefix(IMPORT_PREFIX).partition(":")
    try:
        return getattr(importlib.import_module(module_path), attr)
    except (ImportError, AttributeError) as error:
        raise SpecTreeError(f"cannot import '{name}': {error}") from None


def build_module(spec: ModuleSpec | type | Callable[..., nn.Module], *args: Any,
                 **kwargs: Any) -> nn.Module:
    """Instantiate a resolved spec: `module(*args, **params, **kwargs, submodules=...)`."""
    if not isinstance(spec, ModuleSpec):
        return spec(*args, **kwargs)
    factory = spec.module
    if isinstance(factory, str):
        raise TypeError(f"spec for '{factory}' is not resolved; call resolve_spec first")
    call_kwargs = {**spec.params, **kwargs}
    if spec.submodules is not None:
        call_kwargs["submodules"] = spec.submodules
    return factory(*args, **call_kwargs)
