"""A document as read from a corpus, before tokenization, and the file read behind it."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from mtp_cli.errors import Problem, UserError


@dataclass(frozen=True)
class Document:
    """One document: raw bytes (text files: no decoding needed for bytes) or decoded text (JSONL).

    `source` names where it came from (a path, or `path:line` for JSONL) for error messages.
    """

    source: str
    content: bytes | str

    def as_bytes(self) -> bytes:
        return self.content.encode("utf-8") if isinstance(self.content, str) else self.content

    def as_text(self) -> str:
        """The text, decoded as UTF-8 whatever the locale; undecodable bytes are a UserError."""
        if isinstance(self.content, str):
            return self.content
        try:
            return self.content.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(problems=[Problem(
                f"not UTF-8 text (byte {exc.start}): a tokenizers tokenizer needs text",
                file=self.source,
            )]) from exc


def is_special_file(path: Path) -> bool:
    """A FIFO, device or socket (links followed): not data, and reading it could block or never
    end. A missing or dangling path is not special: reading it fails with its own error."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def read_file_bytes(path: Path) -> bytes:
    """The bytes of the regular file `path`; anything else (missing, permission, a dangling
    link, a FIFO that would block, a device such as /dev/zero that never ends) is a UserError.

    Opened without blocking, then checked on the open descriptor, so a FIFO swapped in after a
    check is still refused."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise UserError(problems=[Problem(f"cannot read: {exc.strerror or exc}",
                                          file=str(path))]) from exc
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO, device or socket"
            raise UserError(problems=[Problem(f"cannot read: not a regular file ({kind})",
                                              file=str(path))])
        with os.fdopen(os.dup(fd), "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise UserError(problems=[Problem(f"cannot read: {exc.strerror or exc}",
                                          file=str(path))]) from exc
    finally:
        os.close(fd)


def looks_binary(data: bytes, sniff: int = 8192) -> int | None:
    """Offset of the first NUL byte in the first `sniff` bytes (text has none), else None."""
    offset = data.find(b"\x00", 0, sniff)
    return None if offset < 0 else offset
