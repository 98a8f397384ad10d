"""Read a `torch.save` file as a flat state dict, never unpickling arbitrary objects.

First `torch.load(weights_only=True)`; when that refuses the file because some entries are not
plain tensors (Megatron's `_extra_state` `BytesIO` buffers, an `argparse.Namespace` of args), the
zip archive is read again with `TorchArchiveUnpickler`, which rebuilds the tensors from their raw
bytes and turns everything else into counted placeholders. `_extra_state` entries and any other
non-tensor value are skipped and listed, never used.
"""

from __future__ import annotations

import io
import pickle
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mtp_cli.checkpoint.declared_sizes import check_tensors_backed
from mtp_cli.checkpoint.safe_pickle import (
    StorageRef,
    TorchArchiveUnpickler,
    Unreadable,
    read_checked_pickle,
)
from mtp_cli.checkpoint.torch_archive import check_member, check_torch_archive, refuse_legacy_format
from mtp_cli.errors import UserError

# Entries of a training checkpoint that hold the model's state dict, in the order we look.
MODEL_ENTRY_NAMES = ("state_dict", "model", "module")


@dataclass
class StateDictFile:
    """The tensors of a `torch.save` file, by flat name, and what had to be skipped."""

    tensors: dict[str, torch.Tensor]
    skipped: list[str] = field(default_factory=list)
    entry: str | None = None  # the top-level entry holding the state dict, if any
    step: int | None = None  # `iteration` / `step` stored beside it, if any
    safe_fallback: bool = False  # True when weights_only loading refused the file


def _load_weights_only(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        # mmap needs the zip format; old-format files load without it
        return torch.load(path, map_location="cpu", weights_only=True)


def _read_archive(path: Path) -> Any:
    """The archive's object with tensors rebuilt by us and other objects as placeholders."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise UserError(f"{path}: not a torch.save archive (no data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = f"{prefix}byteorder"
        if byteorder in names and archive.read(byteorder).decode().strip() != sys.byteorder:
            raise UserError(f"{path}: saved with {archive.read(byteorder).decode()} byte order")

        def read_storage(ref: StorageRef) -> torch.Tensor:
            data = bytearray(_read_member(path, archive, f"{prefix}data/{ref.key}"))
            itemsize = torch.empty((), dtype=ref.dtype).element_size()
            if len(data) < ref.numel * itemsize:
                raise UserError(f"{path}: storage {ref.key} is truncated")
            return torch.frombuffer(data, dtype=ref.dtype, count=ref.numel) if ref.numel else \
                torch.empty(0, dtype=ref.dtype)

        data_pkl = io.BytesIO(_read_member(path, archive, pickles[0]))
        return TorchArchiveUnpickler(read_checked_pickle(data_pkl), read_storage).load()


def _read_member(path: Path, archive: zipfile.ZipFile, name: str) -> bytes:
    """A member's bytes, after `_check_member`."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise UserError(f"{path}: {name} is missing from the archive") from None
    check_member(path, info, path.stat().st_size)
    return archive.read(info)


def _load_object(path: Path) -> tuple[Any, bool]:
    """(object, used the safe fallback). Raises UserError for files that are not torch.save."""
    if zipfile.is_zipfile(path):
        check_torch_archive(path)  # records hold their storages, no stride-0 giants
    else:
        refuse_legacy_format(path)
    try:
        return _load_weights_only(path), False
    except pickle.UnpicklingError as error:
        refused = "weights only load failed" in str(error).lower()
        if not (refused and zipfile.is_zipfile(path)):
            raise UserError(f"{path}: not a torch.save state dict ({_first_line(error)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise UserError(f"{path}: not a readable torch.save file ({_first_line(error)})") from None
    try:
        return _read_archive(path), True
    except UserError:
        raise
    except (pickle.UnpicklingError, zipfile.BadZipFile, KeyError, EOFError, TypeError,
            ValueError, RuntimeError) as error:
        raise UserError(f"{path}: not a readable torch.save file ({_first_line(error)})") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


def _model_entry(obj: Mapping[str, Any]) -> tuple[Mapping[str, Any], str | None]:
    """A training checkpoint's model state dict (`state_dict`, `model`, `module`), else obj."""
    for name in MODEL_ENTRY_NAMES:
        value = obj.get(name)
        if isinstance(value, Mapping) and _holds_tensors(value):
            return value, name
    return obj, None


def _holds_tensors(mapping: Mapping[str, Any]) -> bool:
    return any(isinstance(v, torch.Tensor) or (isinstance(v, Mapping) and _holds_tensors(v))
               for v in mapping.values())


def _flatten(mapping: Mapping[str, Any], prefix: str, tensors: dict[str, torch.Tensor],
             skipped: list[str]) -> None:
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and not isinstance(value, Unreadable):
            _flatten(value, f"{name}.", tensors, skipped)
        elif isinstance(value, torch.Tensor) and not name.endswith("_extra_state"):
            tensors[name] = value
        else:
            skipped.append(name)


def read_state_dict_file(path: Path) -> StateDictFile:
    """Flat `{name: tensor}` of a `torch.save` state dict (or of its model entry)."""
    obj, fallback = _load_object(path)
    if not isinstance(obj, Mapping):
        raise UserError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    state, entry = _model_entry(obj)
    tensors: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    _flatten(state, "", tensors, skipped)
    if not tensors:
        raise UserError(f"{path}: not a state dict (no tensors in it)")
    check_tensors_backed(path, tensors)
    step = next((obj[k] for k in ("iteration", "step") if isinstance(obj.get(k), int)), None)
    return StateDictFile(tensors, skipped, entry, step if entry else None, fallback)
