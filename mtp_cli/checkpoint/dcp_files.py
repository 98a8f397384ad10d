"""DCP checkpoint directories read through the allow list: metadata, shard checks, loading.

`torch.distributed.checkpoint` unpickles `.metadata` with plain `pickle`, so a crafted file runs
code on `dcp.load`. Every DCP read in the project goes through `SafeFileSystemReader`, whose
`read_metadata` uses the allow-listed unpickler and whose `read_data` names the shard file that
fails; non-tensor values are unpickled with `torch.load(weights_only=True)` (`SafeLoadPlanner`).
Before any value is trusted, `check_shards` makes sure that every file the metadata names is a
plain file in the directory holding every byte range assigned to it.
"""

from __future__ import annotations

import dataclasses
import io
import math
import pickle
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.futures import Future

from mtp_cli.checkpoint.declared_sizes import check_dcp_declared_sizes
from mtp_cli.checkpoint.files import CheckpointFileError, is_regular_file
from mtp_cli.checkpoint.safe_pickle import load_dcp_metadata

METADATA_FILE = ".metadata"


def _short(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(error).__name__


def _bare_name(relative: Any) -> bool:
    """A shard name DCP writes (`__0_0.distcp`): no directory part, no way out of the dir."""
    name = str(relative)
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")


class SafeFileSystemReader(dcp.FileSystemReader):
    """`FileSystemReader` that unpickles `.metadata` through the allow list and names the shard
    file whose bytes fail to load."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        if not path.exists():
            raise CheckpointFileError(path, "is missing: not a DCP checkpoint")
        if not is_regular_file(path):
            raise CheckpointFileError(path, "is not a regular file")
        try:
            with open(path, "rb") as stream:
                metadata = load_dcp_metadata(stream)
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError,
                IndexError, KeyError, ImportError, MemoryError, RecursionError,
                OSError) as error:
            raise CheckpointFileError(path, f"DCP metadata does not parse ({error})") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: Any, planner: Any) -> Future[None]:
        per_file: dict[str, list[Any]] = defaultdict(list)
        for item in plan.items:
            per_file[self.storage_data[item.storage_index].relative_path].append(item)
        for relative, items in per_file.items():
            path = Path(self.path) / str(relative)
            if not _bare_name(relative):
                raise CheckpointFileError(path, "is not a file of the checkpoint directory")
            try:
                super().read_data(dataclasses.replace(plan, items=items), planner).wait()
            except Exception as error:
                raise CheckpointFileError(path, f"does not load ({_short(error)})") from None
        done: Future[None] = Future()
        done.set_result(None)
        return done


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, but non-tensor entries are unpickled with `weights_only=True`
    (DCP itself loads them with `weights_only=False`)."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            safe = torch.load(value, weights_only=True)
        except Exception as error:  # torch's message quotes pages of its weights_only docs
            fqn = getattr(getattr(read_item, "dest_index", None), "fqn", "?")
            raise ValueError(f"stored value {fqn} is not a plain value torch.load(weights_only"
                             f"=True) reads ({type(error).__name__})") from None
        buffer = io.BytesIO()
        torch.save(safe, buffer)
        buffer.seek(0)
        super().load_bytes(read_item, buffer)


def read_metadata(directory: Path) -> Metadata:
    """The DCP metadata of `directory`; `CheckpointFileError` when missing or unparseable."""
    return SafeFileSystemReader(directory).read_metadata()


def _chunk_bytes(entry: TensorStorageMetadata, sizes: Any) -> int:
    return math.prod(int(s) for s in sizes) * entry.properties.dtype.itemsize


def check_shards(directory: Path, metadata: Metadata) -> None:
    """Every shard file the metadata names is a plain file in `directory` holding every byte
    range assigned to it, and each tensor chunk's range is long enough for its elements."""
    directory = Path(directory)
    storage = metadata.storage_data or {}
    needed: dict[str, int] = {}
    for info in storage.values():
        if not _bare_name(info.relative_path):
            raise CheckpointFileError(directory / METADATA_FILE, f"names shard "
                                      f"{info.relative_path!r}, outside the checkpoint directory")
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for relative, end in sorted(needed.items()):
        shard = directory / relative
        if not shard.exists():
            raise CheckpointFileError(shard, f"shard named in {METADATA_FILE} is missing")
        if not is_regular_file(shard):
            raise CheckpointFileError(shard, "shard is not a regular file")
        size = shard.stat().st_size
        if size < end:
            raise CheckpointFileError(shard, f"shard is truncated ({size} bytes, the metadata "
                                             f"needs {end})")
    for fqn, entry in tensor_entries(metadata).items():
        for chunk in entry.chunks:
            info = storage.get(MetadataIndex(fqn, chunk.offsets))
            if info is None:
                raise CheckpointFileError(directory / METADATA_FILE,
                                          f"stores no data for a chunk of {fqn}")
            if not info.transform_descriptors and int(info.length) < _chunk_bytes(entry,
                                                                                   chunk.sizes):
                raise CheckpointFileError(directory / info.relative_path, (
                    f"holds {info.length} bytes for a chunk of {fqn} of shape "
                    f"{tuple(chunk.sizes)}, fewer than its elements need"))
    check_dcp_declared_sizes(directory, metadata)  # chunks tile each declared size


def tensor_entries(metadata: Metadata) -> dict[str, TensorStorageMetadata]:
    return {k: v for k, v in metadata.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


def value_entries(metadata: Metadata) -> list[str]:
    """Keys of non-tensor values (ints, dicts): listed, never read (reading them unpickles)."""
    return [k for k, v in metadata.state_dict_metadata.items()
            if isinstance(v, BytesStorageMetadata)]


class _ReadMetadataReader(SafeFileSystemReader):
    """The safe reader of a checkpoint whose metadata the caller has already read: reading
    tensors one at a time (`load_tensors`) would otherwise unpickle `.metadata` twice each."""

    def __init__(self, directory: Path, metadata: Metadata) -> None:
        super().__init__(directory)
        self._metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if getattr(self._metadata, "storage_meta", None) is None:
            self._metadata.storage_meta = StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


def load_state(state: dict[str, Any], directory: Path, *, no_dist: bool = False,
               metadata: Metadata | None = None) -> None:
    """`dcp.load` of `state` from `directory` through the safe reader and planner; a failure
    on any rank raises `CheckpointFileError` on every rank, naming the file when known.
    `metadata`: the directory's metadata, when the caller has read it already."""
    if metadata is None:
        read_metadata(directory)  # first: DCP would fold its failure into a vaguer error
        reader: SafeFileSystemReader = SafeFileSystemReader(directory)
    else:
        reader = _ReadMetadataReader(directory, metadata)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no_dist: "assuming the intent is ... single process"
            dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=no_dist)
    except CheckpointException as error:
        raise _first_failure(error, Path(directory)) from None
    except CheckpointFileError:
        raise
    except Exception as error:  # raised outside DCP's gather (no_dist): same message
        raise CheckpointFileError(directory, f"does not load ({_short(error)})") from None


def _first_failure(error: CheckpointException, directory: Path) -> CheckpointFileError:
    for failure in error.failures.values():
        cause = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(cause, CheckpointFileError):
            return cause
    causes = [f[0] if isinstance(f, tuple) else f for f in error.failures.values()]
    return CheckpointFileError(directory, f"does not load ({_short(causes[0]) if causes else error})")


def load_tensors(directory: Path, metadata: Metadata, keys: list[str]) -> dict[str, torch.Tensor]:
    """Values of the tensors `keys` (flat DCP keys) as CPU tensors; nothing else is read."""
    entries = tensor_entries(metadata)
    missing = [k for k in keys if k not in entries]
    if missing:
        raise KeyError(missing)
    flat = {k: torch.empty(tuple(entries[k].size), dtype=entries[k].properties.dtype)
            for k in keys}
    load_state(_nest(flat, metadata), directory, no_dist=True, metadata=metadata)
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
