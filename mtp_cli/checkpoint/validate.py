"""Whether one checkpoint directory can be resumed from, checked without loading any tensor.

A checkpoint *validates* when its `meta.json` is a JSON object whose integer `step` is the step
its directory is named after, its `.metadata` parses through the allow list, every shard file
the metadata names exists and is long enough, and (when `meta.json` records them) every file
still has its SHA-256. Each failure names the file at fault.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint.metadata import Metadata

from mtp_cli.checkpoint.checksums import verify_checksums
from mtp_cli.checkpoint.dcp_files import METADATA_FILE, check_shards, read_metadata
from mtp_cli.checkpoint.files import CheckpointFileError, read_json_object

META_JSON = "meta.json"


@dataclass(frozen=True)
class ValidCheckpoint:
    """A checkpoint directory that validated, with what validating it read."""

    path: Path
    step: int
    meta: dict[str, Any]
    metadata: Metadata


def meta_step(meta: dict[str, Any], path: Path) -> int:
    """meta.json's `step`: an integer (not a bool, not a float) >= 0."""
    step = meta.get("step")
    if type(step) is not int or step < 0:
        raise CheckpointFileError(path, f"'step' is {step!r}, not a step number")
    return step


def validate_checkpoint(path: Path, step: int, *, checksums: bool = True) -> ValidCheckpoint:
    """`path` as a `ValidCheckpoint` of step `step`, or `CheckpointFileError` naming the file.

    `checksums=False` skips the digests (reading every byte) even when meta.json records them.
    """
    path = Path(path)
    meta_path = path / META_JSON
    meta = read_json_object(meta_path)
    stored = meta_step(meta, meta_path)
    if stored != step:
        raise CheckpointFileError(meta_path, f"'step' is {stored}, but the directory "
                                             f"{path.name} holds step {step}")
    metadata = read_metadata(path)
    check_shards(path, metadata)
    if checksums and "checksums" in meta:
        shards = sorted({str(info.relative_path) for info in metadata.storage_data.values()})
        verify_checksums(path, meta["checksums"], [METADATA_FILE, *shards])
    return ValidCheckpoint(path=path, step=step, meta=meta, metadata=metadata)
