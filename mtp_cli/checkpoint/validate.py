"""Whether one checkpoint directory can be resumed from, checked without loading any tensor.

A checkpoint *validates* when its `meta.json` passes the meta record's reader (`meta.read_meta`:
a JSON object whose `step` is an integer, every other key of its type) and that step is the one
its directory is named after, its `.metadata` parses through the allow list, every shard file
the metadata names exists and is long enough, and (when `meta.json` records them) every file
still has its SHA-256. Each failure names the file at fault.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch.distributed.checkpoint.metadata import Metadata

from mtp_cli.checkpoint.checksums import verify_checksums
from mtp_cli.checkpoint.dcp_files import METADATA_FILE, check_shards, read_metadata
from mtp_cli.checkpoint.files import CheckpointFileError
from mtp_cli.checkpoint.layout import META_JSON, meta_path
from mtp_cli.checkpoint.meta import CheckpointMeta, read_meta

__all__ = ["META_JSON", "ValidCheckpoint", "validate_checkpoint"]


@dataclass(frozen=True)
class ValidCheckpoint:
    """A checkpoint directory that validated, with what validating it read."""

    path: Path
    step: int
    meta: CheckpointMeta
    metadata: Metadata


def validate_checkpoint(path: Path, step: int, *, checksums: bool = True) -> ValidCheckpoint:
    """`path` as a `ValidCheckpoint` of step `step`, or `CheckpointFileError` naming the file.

    `checksums=False` skips the digests (reading every byte) even when meta.json records them.
    """
    path = Path(path)
    meta = read_meta(path)
    if meta.step != step:
        raise CheckpointFileError(meta_path(path), f"'step' is {meta.step}, but the directory "
                                                   f"{path.name} holds step {step}")
    metadata = read_metadata(path)
    check_shards(path, metadata)
    if checksums and meta.checksums is not None:
        shards = sorted({str(info.relative_path) for info in metadata.storage_data.values()})
        verify_checksums(path, meta.checksums, [METADATA_FILE, *shards])
    return ValidCheckpoint(path=path, step=step, meta=meta, metadata=metadata)
