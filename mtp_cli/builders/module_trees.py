"""The model's ModuleSpec trees: defaults, the spec file's overrides, resolution to classes.

A run spec's `modules` section may replace the decoder layer tree and the MTP layer tree. The MTP
layer's `transformer_layer` defaults to the decoder layer tree (Megatron builds it from the
decoder's last layer spec). `resolved_module_trees` is what `mtp build --show-spec` prints: a valid
`modules` section that round-trips unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import mtp_cli.models  # noqa: F401  (registers the modules)
from mtp_cli.config.schema import RunSpec
from mtp_cli.errors import Problem
from mtp_cli.models.backends import BackendSpecProvider, LocalSpecProvider, TESpecProvider
from mtp_cli.models.layer_specs import decoder_layer_spec
from mtp_cli.models.transformer_layer import transformer_layer_spec
from mtp_cli.mtp.layer import (
    SUPPORTED_ATTN_MASK,
    attn_mask_type_of,
    get_mtp_layer_spec_for_backend,
)
from mtp_cli.nn.module_spec import (
    IMPORT_PREFIX,
    MODULE_REGISTRY,
    ModuleSpec,
    SpecTreeError,
    check_module_name,
    import_module_target,
    parse_module_tree,
    submodule_items,
)
from mtp_cli.plan.run_plan import mtp_depths


def resolved_module_trees(spec: RunSpec) -> dict[str, dict[str, Any]]:
    """`{decoder_layer: tree, mtp_layer: tree}` with defaults filled in (plain dicts)."""
    decoder = copy.deepcopy(spec.modules.decoder_layer) or decoder_layer_spec(spec.model).to_dict()
    if spec.modules.mtp_layer:
        mtp = copy.deepcopy(spec.modules.mtp_layer)
    else:
        mtp = get_mtp_layer_spec_for_backend(ModuleSpec("TransformerLayer")).to_dict()
        del mtp["submodules"]["transformer_layer"]
    children = mtp.get("submodules") if isinstance(mtp, dict) else None
    if children is None and isinstance(mtp, dict):
        children = mtp["submodules"] = {}
    if isinstance(children, dict) and children.get("transformer_layer") is None:
        children["transformer_layer"] = copy.deepcopy(decoder)
    return {"decoder_layer": decoder, "mtp_layer": mtp}


def _check_complete(spec: ModuleSpec, path: str) -> None:
    """Every submodule a registered module builds must be given (IdentityOp drops one)."""
    registered = MODULE_REGISTRY.get(spec.module) if isinstance(spec.module, str) else None
    children = submodule_items(spec.submodules)
    if registered and registered.submodules_type:
        for item in dataclasses.fields(registered.submodules_type):
            if children.get(item.name) is None and not item.metadata.get("optional"):
                raise SpecTreeError(problems=[Problem(
                    f"{spec.module} needs submodule '{item.name}'", key=f"{path}.submodules",
                    hint="name IdentityOp to leave it out")])
    for name, child in children.items():
        _check_complete(child, f"{path}.submodules.{name}")


def parse_module_trees(spec: RunSpec, *, allow_imports: bool) -> dict[str, ModuleSpec]:
    """Validate both trees (names, submodule names, imports) into unresolved ModuleSpecs."""
    trees = resolved_module_trees(spec)
    parsed = {}
    for name, tree in trees.items():
        path = f"modules.{name}"
        parsed[name] = parse_module_tree(tree, path, allow_imports=allow_imports)
        _check_complete(parsed[name], path)
    depths = mtp_depths(spec)
    if parsed["mtp_layer"].module != "MultiTokenPredictionLayer" and depths:
        check_module_name(str(parsed["mtp_layer"].module), "modules.mtp_layer.module",
                          allow_imports=allow_imports)
    if depths:
        _check_mtp_attention_mask(spec, parsed["mtp_layer"])
    return parsed


def _check_mtp_attention_mask(spec: RunSpec, mtp_layer: ModuleSpec) -> None:
    """An MTP layer's transformer layer must use a mask MTP supports (`SUPPORTED_ATTN_MASK`)."""
    layer = submodule_items(mtp_layer.submodules).get("transformer_layer")
    mask = attn_mask_type_of(layer)
    if mask is None or mask in SUPPORTED_ATTN_MASK:
        return
    own = (spec.modules.mtp_layer or {}).get("submodules", {}) or {}
    where = ("modules.mtp_layer.submodules.transformer_layer" if "transformer_layer" in own
             else "modules.decoder_layer")
    raise SpecTreeError(problems=[Problem(
        f"Multi-Token Prediction does not support the {mask!r} attention mask",
        key=f"{where}.submodules.self_attention.params.attn_mask_type",
        hint=f"use one of {', '.join(SUPPORTED_ATTN_MASK)}")])


def resolve_spec(spec: ModuleSpec, backend: BackendSpecProvider, *,
                 allow_imports: bool) -> ModuleSpec:
    """Replace names with classes: registered modules, backend slots, opted-in imports."""
    name = spec.module
    registered = None
    if isinstance(name, str):
        if name.startswith("backend."):
            factory = getattr(backend, name.removeprefix("backend."))()
        elif name.startswith(IMPORT_PREFIX):
            check_module_name(name, "module", allow_imports=allow_imports)
            factory = import_module_target(name)
            registered = _registered_ancestor(factory)
        else:
            registered = MODULE_REGISTRY[name]
            factory = registered.factory
    else:
        factory = name
    children = {
        child_name: resolve_spec(child, backend, allow_imports=allow_imports)
        for child_name, child in submodule_items(spec.submodules).items()
    }
    if registered is not None and registered.submodules_type is not None:
        submodules: Any = registered.submodules_type(**children)
    else:
        submodules = children or None
    return ModuleSpec(module=factory, params=dict(spec.params), submodules=submodules)


def _registered_ancestor(factory: Any) -> Any:
    """The registered module an imported class extends, if any: a subclass of
    `MultiTokenPredictionLayer` (overriding, say, `_concat_embeddings`) gets its submodules
    dataclass, so it is built exactly like the class it extends."""
    for cls in getattr(factory, "__mro__", ()):
        entry = MODULE_REGISTRY.get(getattr(cls, "spec_name", ""))
        if entry is not None and entry.factory is cls:
            return entry
    return None


def backend_for(spec: RunSpec) -> BackendSpecProvider:
    return TESpecProvider() if spec.model.backend == "te" else LocalSpecProvider()


def build_specs(spec: RunSpec, *, allow_imports: bool = False
                ) -> tuple[ModuleSpec, ModuleSpec, ModuleSpec]:
    """Resolved (decoder layer, MTP layer, final norm) specs for `spec`'s backend."""
    backend = backend_for(spec)
    parsed = parse_module_trees(spec, allow_imports=allow_imports)
    return (
        resolve_spec(parsed["decoder_layer"], backend, allow_imports=allow_imports),
        resolve_spec(parsed["mtp_layer"], backend, allow_imports=allow_imports),
        resolve_spec(ModuleSpec("backend.layer_norm"), backend, allow_imports=allow_imports),
    )


def get_gpt_layer_local_spec() -> ModuleSpec:
    """Megatron's name: the decoder layer spec with plain-PyTorch classes."""
    parsed = parse_module_tree(transformer_layer_spec().to_dict(), "decoder_layer",
                               allow_imports=False)
    return resolve_spec(parsed, LocalSpecProvider(), allow_imports=False)


def get_gpt_layer_with_transformer_engine_spec() -> ModuleSpec:
    """Megatron's name: the decoder layer spec with Transformer Engine classes."""
    parsed = parse_module_tree(transformer_layer_spec().to_dict(), "decoder_layer",
                               allow_imports=False)
    return resolve_spec(parsed, TESpecProvider(), allow_imports=False)
