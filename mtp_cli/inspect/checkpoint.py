"""Open PATH for inspection: a DCP checkpoint, a run directory, or a `torch.save` file.

Either way the result is a `Checkpoint`: the model's tensor names, shapes and dtypes up front
(from DCP metadata, or from the loaded file), and `read(names)` for the few values the tie checks
compare. A run directory means its newest complete checkpoint (`checkpoints/latest`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mtp_cli.errors import UserError
from mtp_cli.inspect import dcp_reader
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
    meta: dict[str, Any] | None = None  # meta.json
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
    target, note = resolve_checkpoint_dir(path)
    checkpoint = _open_dcp(target)
    if note:
        checkpoint.notes.insert(0, note)
    return checkpoint


def resolve_checkpoint_dir(path: Path) -> tuple[Path, str | None]:
    """The DCP directory meant by `path`: itself, or a run/checkpoints directory's latest."""
    if (path / dcp_reader.METADATA_FILE).is_file():
        return path, None
    checkpoints = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    latest = checkpoints / "latest"
    if latest.is_file():
        name = latest.read_text().strip()
        target = checkpoints / name
        if not name or not (target / dcp_reader.METADATA_FILE).is_file():
            raise UserError(f"{latest}: names {name!r}, which is not a checkpoint directory "
                            f"in {checkpoints}")
        return target, f"{path}: latest checkpoint {name}"
    complete = sorted(p for p in checkpoints.glob("step_*") if p.is_dir() and ".tmp" not in p.name
                      and (p / dcp_reader.METADATA_FILE).is_file()
                      and (p / dcp_reader.META_JSON).is_file())
    if complete:
        return complete[-1], f"{checkpoints}: no 'latest' file; using the newest complete " \
                             f"checkpoint {complete[-1].name}"
    raise UserError(f"{path}: not a checkpoint (no {dcp_reader.METADATA_FILE}, no "
                    f"checkpoints/latest, no complete step_* checkpoint)")


def _model_prefix(keys: list[str]) -> str:
    """`model.` when the model's state dict sits under that DCP key (as `mtp train` saves)."""
    if any(k.startswith(MODEL_PREFIX) and k[len(MODEL_PREFIX):].startswith(_MEGATRON_HEADS)
           for k in keys):
        return MODEL_PREFIX
    return ""


def _open_dcp(directory: Path) -> Checkpoint:
    metadata = dcp_reader.read_metadata(directory)
    dcp_reader.check_shards(directory, metadata)
    meta = dcp_reader.read_meta_json(directory)
    entries = dcp_reader.tensor_entries(metadata)
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
        loaded = dcp_reader.load_tensors(directory, metadata, [prefix + n for n in names])
        return {n: loaded[prefix + n] for n in names}

    notes = [] if meta is not None else [f"{directory}: no {dcp_reader.META_JSON} (no stored "
                                         "spec, step or losses)"]
    step = meta.get("step") if meta else None
    return Checkpoint("dcp", directory, tensors, reader, others=others,
                      values=dcp_reader.value_entries(metadata), meta=meta, notes=notes,
                      step=step if isinstance(step, int) else None)


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
