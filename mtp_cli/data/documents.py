"""A document as read from a corpus, before tokenization, and the file read behind it."""

from __future__ import annotations

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


def read_file_bytes(path: Path) -> bytes:
    """The bytes of `path`; any OS error (missing, permission, a dangling link) is a UserError."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UserError(problems=[Problem(f"cannot read: {exc.strerror or exc}",
                                          file=str(path))]) from exc
