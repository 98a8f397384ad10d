"""Checkpoint files read without trusting them, shared by train, inspect and export.

`safe_pickle` (the allow-list unpicklers), `dcp_files` (DCP metadata, shard checks and loads
through them), `files` (bounded reads of small files, `CheckpointFileError`), `checksums`
(SHA-256 per file) and `validate` (whether one checkpoint directory can be resumed from).
Which checkpoint of a run directory to use is `mtp_cli.checkpoint.run_dir`'s business.
"""

from mtp_cli.checkpoint.dcp_files import (
    METADATA_FILE,
    SafeFileSystemReader,
    SafeLoadPlanner,
    check_shards,
    load_state,
    load_tensors,
    read_metadata,
    tensor_entries,
    value_entries,
)
from mtp_cli.checkpoint.files import CheckpointFileError, read_json_object
from mtp_cli.checkpoint.validate import META_JSON, ValidCheckpoint, validate_checkpoint

__all__ = [
    "METADATA_FILE", "META_JSON", "CheckpointFileError", "SafeFileSystemReader",
    "SafeLoadPlanner", "ValidCheckpoint", "check_shards", "load_state", "load_tensors",
    "read_json_object", "read_metadata", "tensor_entries", "validate_checkpoint",
    "value_entries",
]
