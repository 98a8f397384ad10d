"""Where documents come from: the embedded default corpus and the readers behind `data.path`.

Every reader returns documents in a fixed order that depends only on the files (paths are
sorted as strings, bytes are never decoded through the locale), so every machine that has the
same files builds the same corpus.

- Default (no `data.path`): the `.py` sources of the running Python's standard library, one
  document per file, found through `sysconfig`. Besides `site-packages`/`dist-packages` (third
  party code) we leave out what Linux distributions ship in separate packages or generate per
  machine, so that the corpus is the same on every installation of one Python version: test
  suites (`test`, `tests`, `idle_test`), `idlelib`, `tkinter`, `turtledemo`, `lib2to3`,
  `distutils`, `ensurepip`, `config-*` and `_sysconfigdata*`. On CPython 3.11.7 that is 512
  files and 10.0 MB (about 0.3 s to read and tokenize).
- A text file: one document. A directory: every regular file below it in sorted relative-path
  order (hidden entries are skipped; binary files, those with a NUL byte in their first 8 KiB,
  and anything that is not a regular file, such as a FIFO that would block or a link to
  /dev/zero that never ends, are skipped with a warning; `.jsonl` files are read as JSONL), one
  document per file. A single file given as `data.path` that looks binary is read as bytes, with
  a warning.
- JSONL (`.jsonl`/`.ndjson`): one document per non-blank line, from its `text` field.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Callable
from pathlib import Path

from mtp_cli.data.documents import Document, is_special_file, looks_binary, read_file_bytes
from mtp_cli.errors import Problem, UserError, yaml_kind

JSONL_SUFFIXES = (".jsonl", ".ndjson")
STDLIB_EXCLUDED_DIRS = frozenset({
    "site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "idlelib",
    "tkinter", "turtledemo", "lib2to3", "distutils", "ensurepip",
})


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's `.py` files that make the default corpus, in sorted order."""
    root = root or stdlib_root()
    found = []
    for directory, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS
                       and not d.startswith((".", "config-"))]
        found += [Path(directory, f) for f in filenames
                  if f.endswith(".py") and not f.startswith(("_sysconfigdata", "."))]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def stdlib_documents() -> list[Document]:
    """The default corpus: one document per standard-library source file."""
    root = stdlib_root()
    return [Document(path.relative_to(root).as_posix(), read_file_bytes(path))
            for path in stdlib_files(root)]


def jsonl_documents(path: Path) -> list[Document]:
    """One document per non-blank line of a JSONL file, from its `text` field."""
    raw = read_file_bytes(path)
    documents = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue

        def bad(message: str, line_number: int = number) -> UserError:
            return UserError(problems=[Problem(message, file=str(path), line=line_number)])

        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise bad(f"not a JSON line: {exc}") from exc
        if not isinstance(record, dict) or "text" not in record:
            raise bad("expected a JSON object with a 'text' field")
        if not isinstance(record["text"], str):
            raise bad(f"'text' must be a string, got {yaml_kind(record['text'])}")
        documents.append(Document(f"{path}:{number}", record["text"]))
    return documents


Warn = Callable[[str], None]


def ignore_warning(_: str) -> None:
    pass


def directory_documents(root: Path, warn: Warn = ignore_warning) -> list[Document]:
    """Every non-hidden, regular, non-binary file below `root`, in sorted relative-path order."""
    files = []
    for directory, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        files += [Path(directory, f) for f in filenames if not f.startswith(".")]
    documents = []
    binary: list[str] = []
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        if is_special_file(path):
            warn(f"data.path: skipped {path}: not a regular file (a FIFO, device or socket)")
            continue
        if path.suffix in JSONL_SUFFIXES:
            documents += jsonl_documents(path)
            continue
        data = read_file_bytes(path)
        if looks_binary(data) is None:
            documents.append(Document(str(path), data))
        else:
            binary.append(str(path))
    if binary:
        more = f" and {len(binary) - 3} more" if len(binary) > 3 else ""
        warn(f"data.path: skipped {len(binary)} binary file(s) (a NUL byte in the first 8 KiB): "
             f"{', '.join(binary[:3])}{more}")
    return documents


def path_documents(path: Path, warn: Warn = ignore_warning) -> list[Document]:
    """The documents of `data.path` (not an indexed dataset: see `indexed.py`)."""
    if path.is_dir():
        return directory_documents(path, warn)
    if path.suffix in JSONL_SUFFIXES:
        return jsonl_documents(path)
    data = read_file_bytes(path)
    offset = looks_binary(data)
    if offset is not None:
        warn(f"data.path: {path} does not look like text (a NUL byte at offset {offset}); "
             "training on its raw bytes")
    return [Document(str(path), data)]
