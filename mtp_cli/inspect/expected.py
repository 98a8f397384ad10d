"""What a spec says a checkpoint holds: the model built on the meta device, names and shapes.

Nothing is allocated: the model is compiled on the meta device exactly as `mtp train` builds it,
and its `state_dict()` gives every name and shape the trainer writes under DCP's `model.` key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mtp_cli.config.schema import RunSpec
from mtp_cli.errors import Problem, SpecError, UserError, yaml_kind


def spec_from_meta(meta: dict[str, Any], meta_path: Path) -> RunSpec | None:
    """The spec stored in `meta.json`, validated; None when the file stores none."""
    from mtp_cli.config.loader import load_spec

    stored = meta.get("spec")
    if stored is None:
        return None
    if not isinstance(stored, dict):
        raise UserError(f"{meta_path}: 'spec' is {yaml_kind(stored)}, not a mapping")
    try:
        return load_spec(stored, allow_imports=False)
    except SpecError as error:
        raise SpecError(problems=[
            Problem(p.message, file=str(meta_path), key=f"spec.{p.key}" if p.key else "spec",
                    hint=p.hint) for p in error.problems
        ]) from None


def expected_shapes(spec: RunSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the spec's model state dict and its shape (meta device)."""
    from mtp_cli.builders.model_builder import state_dict_shapes

    return state_dict_shapes(spec)
