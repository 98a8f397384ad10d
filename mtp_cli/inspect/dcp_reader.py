"""Read a DCP checkpoint directory without a process group and without building the model.

The tensor list comes from DCP's `.metadata` (global shapes and dtypes, whatever the parallel
layout that wrote it), read by our allow-listed unpickler. Before any value is trusted, every
shard the metadata points at must exist and be long enough: a truncated shard is reported by
name instead of failing half-way through a load. Values are read only for the tensors asked for,
with `torch.distributed.checkpoint.load(..., no_dist=True)` into CPU tensors.
"""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    StorageMeta,
    TensorStorageMetadata,
)

from mtp_cli.errors import UserError
from mtp_cli.inspect.safe_pickle import load_dcp_metadata

METADATA_FILE = ".metadata"
META_JSON = "meta.json"


class SafeFileSystemReader(dcp.FileSystemReader):
    """`FileSystemReader` whose `.metadata` is unpickled through the allow list."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = load_dcp_metadata(stream)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def read_metadata(directory: Path) -> Metadata:
    """The DCP metadata of `directory`; UserError when it is missing or does not parse."""
    path = directory / METADATA_FILE
    if not path.is_file():
        raise UserError(f"{directory}: not a DCP checkpoint (no {METADATA_FILE})")
    try:
        return SafeFileSystemReader(directory).read_metadata()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError,
            IndexError, KeyError, ImportError) as error:
        raise UserError(f"{path}: DCP metadata does not parse ({error})") from None


def check_shards(directory: Path, metadata: Metadata) -> None:
    """Every shard file exists and holds every byte range the metadata assigns to it."""
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for relative, end in sorted(needed.items()):
        shard = directory / relative
        if not shard.is_file():
            raise UserError(f"{shard}: shard named in {METADATA_FILE} is missing")
        size = shard.stat().st_size
        if size < end:
            raise UserError(f"{shard}: shard is truncated ({size} bytes, the metadata needs "
                            f"{end})")


def read_meta_json(directory: Path) -> dict[str, Any] | None:
    """`meta.json` beside the shards (written last by `mtp train`), or None when absent."""
    path = directory / META_JSON
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: does not parse as JSON ({error})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(meta).__name__}")
    return meta


def tensor_entries(metadata: Metadata) -> dict[str, TensorStorageMetadata]:
    return {k: v for k, v in metadata.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


def value_entries(metadata: Metadata) -> list[str]:
    """Keys of non-tensor values (ints, dicts): listed, never read (reading them unpickles)."""
    return [k for k, v in metadata.state_dict_metadata.items()
            if isinstance(v, BytesStorageMetadata)]


def load_tensors(directory: Path, metadata: Metadata, keys: list[str]) -> dict[str, torch.Tensor]:
    """Values of the tensors `keys` (flat DCP keys) as CPU tensors; nothing else is read."""
    entries = tensor_entries(metadata)
    missing = [k for k in keys if k not in entries]
    if missing:
        raise KeyError(missing)
    flat = {k: torch.empty(tuple(entries[k].size), dtype=entries[k].properties.dtype)
            for k in keys}
    nested = _nest(flat, metadata)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process"
            dcp.load(nested, storage_reader=SafeFileSystemReader(directory), no_dist=True)
    except Exception as error:  # DCP wraps reader errors in CheckpointException
        raise UserError(f"{directory}: could not read {', '.join(keys)} ({_short(error)})"
                        ) from None
    return flat


def _nest(flat: dict[str, torch.Tensor], metadata: Metadata) -> dict[str, Any]:
    """Rebuild the nesting DCP flattened (`planner_data` maps a flat key to its path)."""
    planner_data = metadata.planner_data or {}
    nested: dict[str, Any] = {}
    for key, tensor in flat.items():
        path = planner_data.get(key, (key,))
        node = nested
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = tensor
    return nested


def _short(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(error).__name__
