"""The small files of a checkpoint (`meta.json`, `latest`), read without trusting them, and the
error that names a checkpoint file at fault.

A file handed to us may be a FIFO (a read would block for ever), a link to `/dev/zero` (a read
would never end), huge, or not text. So: open without blocking, accept only a regular file,
refuse it past a stated size before reading, decode UTF-8 strictly, parse JSON with its errors
turned into messages, and bound every number in it: an integer past `MAX_JSON_INT` (a 4,300-digit
one would raise Python's own `ValueError`), a float that overflows to inf, NaN or Infinity is
refused naming the file and the key that holds it (no count, size or step is that large).
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

from mtp_cli.errors import Problem, UserError

META_JSON_LIMIT = 64 * 2**20  # bytes; a meta.json holds the resolved spec, a few KiB
MARKER_LIMIT = 4096  # bytes; `latest` holds one directory name
MAX_JSON_INT = 10**18  # larger than any count, size or step a checkpoint or model records


class CheckpointFileError(UserError):
    """A checkpoint file that is missing, damaged or not what it claims to be (exit 2, named)."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path, self.reason = Path(path), reason
        super().__init__(problems=[Problem(reason, file=str(path))])

    def __reduce__(self) -> tuple[Any, ...]:  # DCP gathers a rank's failure to every rank
        return (type(self), (str(self.path), self.reason))


def is_regular_file(path: Path) -> bool:
    """Whether `path` is (or links to) a regular file; FIFOs and devices are not."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def read_bounded_bytes(path: Path, limit: int) -> bytes:
    """The bytes of regular file `path`, refused past `limit` bytes (never read beyond it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise CheckpointFileError(path, "is missing") from None
    except OSError as error:
        raise CheckpointFileError(path, f"cannot be read ({error.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointFileError(path, "is not a regular file")
        if info.st_size > limit:
            raise CheckpointFileError(path, f"is {info.st_size} bytes, more than the {limit} "
                                            "bytes such a file may hold")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as error:
        raise CheckpointFileError(path, f"cannot be read ({error.strerror})") from None
    finally:
        os.close(fd)
    if size > limit:
        raise CheckpointFileError(path, f"is more than the {limit} bytes such a file may hold")
    return b"".join(chunks)


def read_text(path: Path, limit: int) -> str:
    """Regular file `path` as strict UTF-8 text of at most `limit` bytes."""
    try:
        return read_bounded_bytes(path, limit).decode("utf-8")
    except UnicodeDecodeError as error:
        raise CheckpointFileError(path, f"is not UTF-8 text (byte {error.start})") from None


def read_json_object(path: Path, limit: int = META_JSON_LIMIT) -> dict[str, Any]:
    """A JSON object from `path`; anything else (a list, bad JSON, not UTF-8) names the file."""
    text = read_text(path, limit)
    try:
        value = json.loads(text, parse_int=_bounded_int, parse_float=_finite_float,
                           parse_constant=_Unbounded)
    except json.JSONDecodeError as error:
        raise CheckpointFileError(path, f"does not parse as JSON ({error})") from None
    except RecursionError:
        raise CheckpointFileError(path, "does not parse as JSON (nested too deeply)") from None
    if not isinstance(value, dict):
        raise CheckpointFileError(path, f"holds a JSON {_json_kind(value)}, not an object")
    found = _first_unbounded(value, "")
    if found is not None:
        key, number = found
        raise CheckpointFileError(path, f"{key or 'a value'}: {number.text} is not a number "
                                        "mtp-cli reads (an integer past 10^18, or not a finite number)")
    return value


class _Unbounded:
    """A JSON number out of bounds, kept in place until its key is known (a parse hook
    cannot see the key)."""

    def __init__(self, text: str) -> None:
        self.text = text if len(text) <= 24 else f"{text[:12]}...({len(text)} characters)"


def _bounded_int(text: str) -> int | _Unbounded:
    if len(text.lstrip("-")) > 19:  # never int() a long string (Python's 4,300-digit limit)
        return _Unbounded(text)
    value = int(text)
    return value if abs(value) <= MAX_JSON_INT else _Unbounded(text)


def _finite_float(text: str) -> float | _Unbounded:
    value = float(text)
    return value if math.isfinite(value) else _Unbounded(text)


def _first_unbounded(value: Any, key: str) -> tuple[str, _Unbounded] | None:
    """(dotted key, the number) of the first out-of-bounds number in a parsed value."""
    if isinstance(value, _Unbounded):
        return key, value
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = ((f"[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for name, item in items:
        inner = f"{key}{name}" if name.startswith("[") else f"{key}.{name}" if key else name
        found = _first_unbounded(item, inner)
        if found is not None:
            return found
    return None


def _json_kind(value: Any) -> str:
    kinds = {list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)
