"""Sizes a checkpoint declares, checked against the bytes it holds before anything is allocated.

A checkpoint names its own shapes: DCP's `.metadata` gives each tensor a global size and chunks;
a `torch.save` archive gives each tensor a shape and strides over a storage. A crafted file can
declare a terabyte-sized tensor in a few bytes, and reading it for a tie check would allocate
that much. So:

- DCP: every tensor's chunks must lie inside its declared size and cover it exactly (their
  element counts add up to the size's); `dcp_files.check_shards` holds each chunk's bytes in
  its shard to the chunk's elements, and the shards to their lengths, so the file sizes bound
  every declared tensor (a reader allocates the declared size before loading into it).
- `torch.save`: every tensor must be backed by its storage, element for element: a stride-0 or
  overlapping view that presents more elements than its storage holds is refused (comparing
  two of them would materialise the whole view).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata

from mtp_cli.checkpoint.files import CheckpointFileError
from mtp_cli.errors import UserError

METADATA_FILE = ".metadata"

MAX_TRANSFORM_EXPANSION = 1024  # a compressed (transformed) chunk may expand at most this much


def _itemsize(dtype: object) -> int:
    if not isinstance(dtype, torch.dtype):
        raise UserError(f"declares a tensor of dtype {dtype!r}, which is not a torch dtype")
    return torch.empty((), dtype=dtype).element_size()


def check_dcp_declared_sizes(directory: Path, metadata: Metadata) -> None:
    """Every tensor's declared size agrees with its chunks and with the bytes stored for them."""
    for key, entry in metadata.state_dict_metadata.items():
        if isinstance(entry, TensorStorageMetadata):
            _check_tensor_entry(directory, metadata, key, entry)


def _check_tensor_entry(directory: Path, metadata: Metadata, key: str,
                        entry: TensorStorageMetadata) -> None:
    def refuse(reason: str) -> CheckpointFileError:
        return CheckpointFileError(directory / METADATA_FILE, f"tensor {key}: {reason}")

    size = tuple(int(s) for s in entry.size)
    if any(s < 0 for s in size):
        raise refuse(f"negative size {list(size)}")
    try:
        itemsize = _itemsize(entry.properties.dtype)
    except UserError as error:
        raise refuse(str(error)) from None
    total = math.prod(size)
    covered = 0
    for chunk in entry.chunks:
        offsets, sizes = tuple(int(o) for o in chunk.offsets), tuple(int(s) for s in chunk.sizes)
        if len(offsets) != len(size) or len(sizes) != len(size) or any(
                o < 0 or s < 0 or o + s > d for o, s, d in zip(offsets, sizes, size, strict=True)):
            raise refuse(f"a chunk at {list(offsets)} of {list(sizes)} lies outside its declared "
                         f"size {list(size)}")
        elements = math.prod(sizes)
        covered += elements
        info = metadata.storage_data.get(MetadataIndex(key, offsets))
        if info is None:
            raise refuse(f"no shard holds its chunk at {list(offsets)}")
        expansion = MAX_TRANSFORM_EXPANSION if info.transform_descriptors else 1
        if elements * itemsize > int(info.length) * expansion:
            raise refuse(f"declares {list(size)} ({float(total):.3g} elements), but its chunk at "
                         f"{list(offsets)} has {int(info.length):,} bytes in "
                         f"{info.relative_path} for {elements:,} elements of {itemsize} bytes; "
                         "refusing to read it")
    if covered != total:
        raise refuse(f"its chunks hold {covered:,} elements, its declared size {list(size)} "
                     f"has {total:,}")


def check_tensors_backed(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Each tensor presents no more elements than its storage holds (no stride-0 blow-ups)."""
    for name, tensor in tensors.items():
        needed = tensor.numel() * tensor.element_size()
        held = tensor.untyped_storage().nbytes()
        if needed > held:
            raise UserError(
                f"{path}: tensor {name} declares {list(tensor.shape)} ({float(tensor.numel()):.3g}"
                f" elements, strides {list(tensor.stride())}) over a storage of {held:,} bytes "
                f"(a stride-0 or overlapping view); refusing to read it")
