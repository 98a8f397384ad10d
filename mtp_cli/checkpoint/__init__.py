"""The on-disk format, owned here and nowhere else: train, import, inspect, export, generate
and eval go through this package for every name, path, record and rename of it.

`layout` (the names: `checkpoints/`, `latest`, `step_NNNNNNN`, `meta.json`, `.tmp-`), `meta` (the
meta record `CheckpointMeta`, its one validating reader and its writer), `publish` (temporary
name, fsync, atomic rename), `run_dir` (the run directory, its lock, `latest` and which
checkpoint a resume uses), `validate` (whether one checkpoint directory can be resumed from),
`sharded_state` (the model's state as DCP saves it). The untrusted reads: `safe_pickle` (the
allow-list unpicklers), `dcp_files` (DCP metadata, shard checks and loads through them), `files`
(bounded reads of small files and bounded JSON numbers, `CheckpointFileError`), `checksums`
(SHA-256 per file), `torch_archive` (a `torch.save` zip checked before `torch.load`: records
hold their storages, no stride-0 giants).
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
from mtp_cli.checkpoint.layout import META_JSON
from mtp_cli.checkpoint.meta import META_FORMAT, CheckpointMeta, read_meta, write_meta
from mtp_cli.checkpoint.validate import ValidCheckpoint, validate_checkpoint

__all__ = [
    "METADATA_FILE", "META_FORMAT", "META_JSON", "CheckpointFileError", "CheckpointMeta",
    "SafeFileSystemReader", "SafeLoadPlanner", "ValidCheckpoint", "check_shards", "load_state",
    "load_tensors", "read_json_object", "read_meta", "read_metadata", "tensor_entries",
    "validate_checkpoint", "value_entries", "write_meta",
]
