"""Open PATH for inspection: a DCP checkpoint, a run directory, or a `torch.save` file.

Either way the result is a `Checkpoint`: the model's tensor names, shapes and dtypes up front
(from DCP metadata, or from the loaded file), and `read(names)` for the few values the tie checks
compare. A run directory means the checkpoint `mtp train` would resume from (`RunDir.resolve`:
`checkpoints/latest`, or the newest checkpoint that validates, with a note saying why).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mtp_cli import checkpoint as checkpoint_io
from mtp_cli.checkpoint import META_JSON, METADATA_FILE, CheckpointMeta
from mtp_cli.checkpoint.checksums import verify_checksums
from mtp_cli.checkpoint.layout import checkpoints_of, meta_path
from mtp_cli.checkpoint.run_dir import has_checkpoints, resolve_checkpoints
from mtp_cli.errors import UserError
from mtp_cli.inspect.torch_file import read_state_dict_file

MODEL_PREFIX = "model."
_MEGATRON_HEADS = ("decoder.", "embedding.", "mtp.", "output_layer.")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # e.g. "float32"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Checkpoint:
    """A checkpoint opened for inspection; values are read only on request."""

    kind: str  # "dcp" | "torch_save"
    path: Path  # the checkpoint directory or file actually read
    tensors: dict[str, TensorInfo]  # the model's tensors, by model-relative name
    reader: Callable[[list[str]], dict[str, torch.Tensor]]
    others: dict[str, TensorInfo] = field(default_factory=dict)  # optimizer, rng, ...
    values: list[str] = field(default_factory=list)  # non-tensor entries, never read
    skipped: list[str] = field(default_factory=list)  # entries not loaded (_extra_state, ...)
    meta: CheckpointMeta | None = None  # meta.json, validated
    notes: list[str] = field(default_factory=list)
    step: int | None = None

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        return self.reader(names)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def open_checkpoint(path: Path) -> Checkpoint:
    """Open what the user named; UserError (exit 2) for anything that is not a checkpoint."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    if path.is_file():
        return _open_torch_file(path)
    target, notes = resolve_checkpoint_dir(path)
    # a run directory's checkpoint was validated, digests included, when it was resolved
    checkpoint = _open_dcp(target, verified=target != path)
    checkpoint.notes[:0] = notes
    return checkpoint


def resolve_checkpoint_dir(path: Path) -> tuple[Path, list[str]]:
    """The DCP directory meant by `path`: itself, or the checkpoint a run directory (or its
    checkpoints/) resumes from, with notes on how it was chosen."""
    if os.path.lexists(path / METADATA_FILE):
        return path, []
    checkpoints = checkpoints_of(path)
    if has_checkpoints(checkpoints):
        resolution = resolve_checkpoints(checkpoints)
        if resolution.checkpoint is not None:
            chosen = resolution.checkpoint.path.name
            return resolution.checkpoint.path, list(resolution.warnings) or [
                f"{path}: latest checkpoint {chosen}"]
        raise UserError(f"{path}: not a checkpoint ({'; '.join(resolution.warnings)})")
    raise UserError(f"{path}: not a checkpoint (no {METADATA_FILE}, no checkpoints/latest, no "
                    "step_* checkpoint)")


def _model_prefix(keys: list[str]) -> str:
    """`model.` when the model's state dict sits under that DCP key (as `mtp train` saves)."""
    if any(k.startswith(MODEL_PREFIX) and k[len(MODEL_PREFIX):].startswith(_MEGATRON_HEADS)
           for k in keys):
        return MODEL_PREFIX
    return ""


def _read_meta_json(directory: Path) -> CheckpointMeta | None:
    """`meta.json` beside the shards (written last by `mtp train`) through the meta record's
    reader, or None when absent."""
    if not os.path.lexists(meta_path(directory)):
        return None
    return checkpoint_io.read_meta(directory)


def _open_dcp(directory: Path, *, verified: bool = False) -> Checkpoint:
    """The DCP checkpoint `directory`; unless `verified` (resolved from its run directory, which
    checks them), the SHA-256 digests its meta.json records are compared first: every reader
    (inspect-ckpt, export, generate, eval) refuses a file changed after it was written."""
    metadata = checkpoint_io.read_metadata(directory)
    checkpoint_io.check_shards(directory, metadata)
    meta = _read_meta_json(directory)
    if meta is not None and meta.checksums is not None and not verified:
        shards = sorted({str(info.relative_path) for info in metadata.storage_data.values()})
        verify_checksums(directory, meta.checksums, [METADATA_FILE, *shards])
    entries = checkpoint_io.tensor_entries(metadata)
    prefix = _model_prefix(list(entries))
    tensors: dict[str, TensorInfo] = {}
    others: dict[str, TensorInfo] = {}
    for key, entry in entries.items():
        shape, dtype = tuple(int(s) for s in entry.size), _dtype_name(entry.properties.dtype)
        if key.startswith(prefix):
            name = key[len(prefix):]
            tensors[name] = TensorInfo(name, shape, dtype)
        else:
            others[key] = TensorInfo(key, shape, dtype)

    def reader(names: list[str]) -> dict[str, torch.Tensor]:
        loaded = checkpoint_io.load_tensors(directory, metadata, [prefix + n for n in names])
        return {n: loaded[prefix + n] for n in names}

    notes = [] if meta is not None else [f"{directory}: no {META_JSON} (no stored spec, step "
                                         "or losses)"]
    return Checkpoint("dcp", directory, tensors, reader, others=others,
                      values=checkpoint_io.value_entries(metadata), meta=meta, notes=notes,
                      step=meta.step if meta is not None else None)


def _open_torch_file(path: Path) -> Checkpoint:
    loaded = read_state_dict_file(path)
    tensors = {name: TensorInfo(name, tuple(t.shape), _dtype_name(t.dtype))
               for name, t in loaded.tensors.items()}
    notes: list[str] = []
    if loaded.entry:
        notes.append(f"state dict read from the file's '{loaded.entry}' entry")
    if loaded.safe_fallback:
        notes.append("weights_only loading refused some entries; the file was read with a "
                     "restricted reader that never unpickles objects")

    def reader(names: list[str]) -> dict[str, torch.Tensor]:
        return {n: loaded.tensors[n] for n in names}

    return Checkpoint("torch_save", path, tensors, reader, skipped=loaded.skipped, notes=notes,
                      step=loaded.step)
