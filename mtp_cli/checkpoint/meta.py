"""The meta record of a checkpoint (`meta.json`): one dataclass, written by `mtp train` and
`mtp import`, read through one validating reader by every command that opens a checkpoint.

```
{"format": "mtp-cli-checkpoint/1", "step": 300, "tokens": 76800, "spec": {...},
 "losses": {"lm_loss": 3.2, ...}, "world_size": 2, "parallel": {"data": 2, ...},
 "mtp_cumulative": {"correct": [...], "total": [...]}, "created": "...", "mtp_cli_version": "...",
 ...keys of the writer (`imported_from`), "nonfinite": true, "checksums": {file: sha256}}
```
`format` names the format and its version: a record without it (written by hand, or by the
first versions) reads as version 1, a newer version than this code reads is refused. Only `step`
is required; every other key is checked for its type when present. A record that breaks a rule
is a `CheckpointFileError` naming `meta.json` (exit 2), so a resume skips to an older checkpoint
and `inspect-ckpt`, `export`, `generate` and `eval` stop with one line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mtp_cli.checkpoint.files import CheckpointFileError, read_json_object
from mtp_cli.checkpoint.layout import meta_path
from mtp_cli.checkpoint.publish import atomic_write_text

FORMAT_NAME = "mtp-cli-checkpoint"
FORMAT_VERSION = 1
META_FORMAT = f"{FORMAT_NAME}/{FORMAT_VERSION}"
_HEX = re.compile(r"[0-9a-f]{64}")


def _count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _number(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def _mapping(value: Any) -> bool:
    return isinstance(value, dict)


# key -> (accepted when, what it must be): the optional keys, in the order they are written
_OPTIONAL: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tokens": (_count, "a token count"),
    "spec": (_mapping, "a mapping"),
    "losses": (lambda v: _mapping(v) and all(_number(x) for x in v.values()),
               "a mapping of loss names to numbers"),
    "world_size": (_count, "a world size"),
    "parallel": (lambda v: _mapping(v) and all(_count(x) for x in v.values()),
                 "a mapping of parallel sizes"),
    "mtp_cumulative": (_mapping, "a mapping of acceptance counts"),
    "created": (lambda v: isinstance(v, str), "a time stamp"),
    "mtp_cli_version": (lambda v: isinstance(v, str), "a version"),
}
_TRAILING: dict[str, tuple[Callable[[Any], bool], str]] = {
    "nonfinite": (lambda v: isinstance(v, bool), "true or false"),
    "checksums": (lambda v: _mapping(v) and all(
        isinstance(k, str) and isinstance(x, str) and _HEX.fullmatch(x) for k, x in v.items()),
        "a mapping of file names to SHA-256 hex digests"),
}
_NAMED = {"format", "step", *_OPTIONAL, *_TRAILING}


def created_now() -> str:
    """A `created` time stamp: UTC, to the second."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class CheckpointMeta:
    """What `meta.json` records about one checkpoint (None: the key is absent)."""

    step: int
    tokens: int | None = None
    spec: dict[str, Any] | None = None  # the resolved spec, as `RunSpec.model_dump(mode="json")`
    losses: dict[str, float | None] | None = None  # the last step's; null where not finite
    world_size: int | None = None
    parallel: dict[str, int] | None = None  # `ParallelDims.as_dict()`
    mtp_cumulative: dict[str, list[int]] | None = None  # {"correct": [...], "total": [...]}
    created: str | None = None
    mtp_cli_version: str | None = None
    format: str | None = META_FORMAT  # None: a record written before the key (version 1)
    extra: dict[str, Any] = field(default_factory=dict)  # the writer's own keys, kept in order
    nonfinite: bool = False  # some loss in `losses` was NaN or inf (written as null)
    checksums: dict[str, str] | None = None  # {file name: sha256} of every other file

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, keys in the order `mtp train` has always written them."""
        record: dict[str, Any] = {} if self.format is None else {"format": self.format}
        record["step"] = self.step
        record.update({k: getattr(self, k) for k in _OPTIONAL if getattr(self, k) is not None})
        record.update(self.extra)
        if self.nonfinite:
            record["nonfinite"] = True
        if self.checksums is not None:
            record["checksums"] = self.checksums
        return record

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, record: dict[str, Any], path: Path) -> CheckpointMeta:
        """Validate a parsed `meta.json` (from file `path`, named in every refusal)."""
        _check_format(record.get("format"), path)
        step = record.get("step")
        if not _count(step):
            raise CheckpointFileError(path, f"'step' is {step!r}, not a step number")
        for key, (accepted, what) in {**_OPTIONAL, **_TRAILING}.items():
            value = record.get(key)
            if value is not None and not accepted(value):
                raise CheckpointFileError(path, f"'{key}' is {_shown(value)}, not {what}")
        known = {k: record.get(k) for k in (*_OPTIONAL, "checksums")}
        return cls(step=step, format=record.get("format"), **known,
                   nonfinite=bool(record.get("nonfinite")),
                   extra={k: v for k, v in record.items() if k not in _NAMED})


def _check_format(value: Any, path: Path) -> None:
    if value is None:
        return
    name, _, version = value.partition("/") if isinstance(value, str) else ("", "", "")
    if name != FORMAT_NAME or not version.isdigit():
        raise CheckpointFileError(path, f"'format' is {_shown(value)}, not {FORMAT_NAME}/N")
    if int(version) > FORMAT_VERSION:
        raise CheckpointFileError(path, f"'format' is {value!r}: written by a newer mtp-cli "
                                        f"(this one reads {META_FORMAT})")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def read_meta(checkpoint: Path) -> CheckpointMeta:
    """The validated meta record of checkpoint directory `checkpoint`; `CheckpointFileError`
    (exit 2, naming the file) when it is missing, not a bounded UTF-8 JSON object, or breaks a
    rule of the record."""
    path = meta_path(Path(checkpoint))
    return CheckpointMeta.from_dict(read_json_object(path), path)


def write_meta(checkpoint: Path, meta: CheckpointMeta) -> None:
    """Write `meta.json` into checkpoint directory `checkpoint` atomically."""
    atomic_write_text(meta_path(Path(checkpoint)), meta.to_json())
