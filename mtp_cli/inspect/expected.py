"""What a spec says a checkpoint holds: the model built on the meta device, names and shapes.

Nothing is allocated: the model is compiled on the meta device exactly as `mtp train` builds it,
and its `state_dict()` gives every name and shape the trainer writes under DCP's `model.` key.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mtp_cli.checkpoint import CheckpointMeta
from mtp_cli.checkpoint.layout import meta_path
from mtp_cli.config.schema import RunSpec
from mtp_cli.errors import Problem, SpecError, UserError

if TYPE_CHECKING:
    from mtp_cli.inspect.checkpoint import Checkpoint


def spec_from_meta(meta: CheckpointMeta, path: Path) -> RunSpec | None:
    """The spec stored in `meta.json` (file `path`), validated; None when the file stores none."""
    from mtp_cli.config.loader import load_spec

    if meta.spec is None:
        return None
    try:
        return load_spec(meta.spec, allow_imports=False)
    except SpecError as error:
        raise SpecError(problems=[
            Problem(p.message, file=str(path), key=f"spec.{p.key}" if p.key else "spec",
                    hint=p.hint) for p in error.problems
        ]) from None


def checkpoint_spec(checkpoint: Checkpoint, spec_path: Path | None,
                    hint: str | None = "pass --spec SPEC.yaml") -> RunSpec:
    """The spec to read `checkpoint` with (`mtp export`, `generate`, `eval`): the file
    `spec_path` when given, else the one its `meta.json` stores; `UserError` when it stores
    none, with `hint` (None for a command that has no `--spec`)."""
    from mtp_cli.config.loader import load_spec

    if spec_path is not None:
        return load_spec(spec_path)
    stored = spec_from_meta(checkpoint.meta, meta_path(checkpoint.path)) \
        if checkpoint.meta is not None else None
    if stored is None:
        raise UserError(problems=[Problem("stores no spec (no meta.json with one)",
                                          file=str(checkpoint.path),
                                          hint=hint)])
    return stored


def expected_shapes(spec: RunSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the spec's model state dict and its shape (meta device)."""
    from mtp_cli.builders.model_builder import state_dict_shapes

    return state_dict_shapes(spec)
