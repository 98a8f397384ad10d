"""SHA-256 of every file of a checkpoint (`checkpoint.checksums: true`), streamed in 1 MiB reads.

The shard length checks catch a truncated file, not flipped bytes inside tensor data; a digest
recorded in `meta.json` when the checkpoint is written and compared on resume does. `meta.json`
itself is not covered (it holds the digests); its own structure is validated instead.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

from mtp_cli.checkpoint.files import CheckpointFileError, is_regular_file
from mtp_cli.checkpoint.layout import META_JSON, meta_path

CHUNK = 1 << 20
EXCLUDED = frozenset({META_JSON})
_HEX = re.compile(r"[0-9a-f]{64}")


def file_sha256(path: Path) -> str:
    """The SHA-256 hex digest of regular file `path`, read in CHUNK-sized pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def directory_checksums(directory: Path) -> dict[str, str]:
    """`{file name: sha256}` of every regular file directly in `directory` but meta.json."""
    return {name: file_sha256(Path(directory) / name) for name in sorted(os.listdir(directory))
            if name not in EXCLUDED and is_regular_file(Path(directory) / name)}


def verify_checksums(directory: Path, recorded: Any, required: list[str]) -> None:
    """Every file in `recorded` ({name: sha256}) still has its digest, and every file in
    `required` (the shards and .metadata) is among them; `CheckpointFileError` otherwise."""
    directory = Path(directory)
    meta = meta_path(directory)
    if not isinstance(recorded, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and _HEX.fullmatch(v)
            for k, v in recorded.items()):
        raise CheckpointFileError(meta, "'checksums' is not a mapping of file names to SHA-256 "
                                        "hex digests")
    for name in required:
        if name not in recorded:
            raise CheckpointFileError(directory / name, "has no checksum in meta.json")
    for name, expected in sorted(recorded.items()):
        path = directory / name
        if "/" in name or name in (".", "..") or not is_regular_file(path):
            raise CheckpointFileError(path, "is listed in meta.json's checksums but missing")
        if file_sha256(path) != expected:
            raise CheckpointFileError(path, "does not match its SHA-256 checksum in meta.json "
                                            "(the file changed after it was written)")
