"""The records `mtp data prepare` reads, streamed one at a time from JSONL, text and table files.

Inputs expand to files in a fixed order (the inputs as given; a directory's files in sorted
relative-path order, hidden entries skipped, as `data.path` reads them). A file's kind comes from
its name: `.jsonl`/`.ndjson` (and `.json` named directly, Megatron's habit) is JSONL, one record
per non-blank line; `.parquet` is a Parquet table and `.arrow` an Arrow IPC file, one record per
row of the `--json-key` column; a directory that `datasets.Dataset.save_to_disk` wrote (a
`state.json` listing `_data_files`) is its Arrow files in that order; anything else is a text
file, one record. Nothing is read whole except a text file (it is one document): a JSONL file is
read line by line and a table batch by batch, so memory stays bounded whatever the input's size.

Records are not parsed here: a JSONL line travels as bytes and is decoded in a worker, so the
reading process only splits lines.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtp_cli.data.corpus import JSONL_SUFFIXES
from mtp_cli.data.documents import is_special_file, looks_binary, read_file_bytes
from mtp_cli.errors import Problem, UserError

TABLE_SUFFIXES = (".parquet", ".arrow")
BATCH_ROWS = 1024
Warn = Callable[[str], None]


@dataclass(frozen=True)
class Record:
    """One document before decoding: `kind` "json" (a JSONL line's bytes), "text" (a file's
    bytes) or "value" (a table cell, any Python value). `line` is the JSONL line or table row
    (1-based; 0 for a whole file); `nbytes` is its share of the input, for the progress bar."""

    file: str
    line: int
    kind: str
    payload: object
    nbytes: int

    def where(self) -> tuple[str, int | None]:
        """(file, line) for a Problem; table rows are named in the message instead."""
        return self.file, (self.line if self.kind == "json" else None)


@dataclass(frozen=True)
class InputFile:
    path: Path
    kind: str  # "jsonl", "text", "parquet", "arrow"
    size: int


def _saved_dataset_files(directory: Path) -> list[Path] | None:
    """The Arrow files of a `save_to_disk` directory, in its order; None if it is not one."""
    state = directory / "state.json"
    if not state.is_file():
        if (directory / "dataset_dict.json").is_file():
            raise UserError(problems=[Problem(
                "a DatasetDict (several splits): name one split's directory", file=str(directory),
                hint="e.g. " + str(directory / "train"))])
        return None
    try:
        files = json.loads(read_file_bytes(state))["_data_files"]
        return [directory / entry["filename"] for entry in files]
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(problems=[Problem(f"not a datasets state file: {exc}",
                                          file=str(state))]) from exc


def _kind(path: Path, named: bool) -> str:
    if path.suffix in JSONL_SUFFIXES or (named and path.suffix == ".json"):
        return "jsonl"
    return path.suffix[1:] if path.suffix in TABLE_SUFFIXES else "text"


def expand_inputs(inputs: list[Path], warn: Warn) -> list[InputFile]:
    """Every file the inputs name, in reading order, with its kind and size."""
    found: list[InputFile] = []
    for given in inputs:
        if not given.exists():
            raise UserError(problems=[Problem("does not exist", file=str(given))])
        if given.is_dir():
            saved = _saved_dataset_files(given)
            if saved is not None:
                found += [InputFile(p, "arrow", p.stat().st_size) for p in saved]
                continue
            files = []
            for directory, dirnames, filenames in os.walk(given):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                files += [Path(directory, f) for f in filenames if not f.startswith(".")]
            for path in sorted(files, key=lambda p: p.relative_to(given).as_posix()):
                if is_special_file(path):
                    warn(f"skipped {path}: not a regular file (a FIFO, device or socket)")
                    continue
                found.append(InputFile(path, _kind(path, named=False), path.stat().st_size))
        else:
            found.append(InputFile(given, _kind(given, named=True), given.stat().st_size))
    return found


def _jsonl_records(path: Path) -> Iterator[Record]:
    try:
        handle = open(path, "rb")  # noqa: SIM115 (closed below; a generator's lifetime)
    except OSError as exc:
        raise UserError(problems=[Problem(f"cannot read: {exc.strerror or exc}",
                                          file=str(path))]) from exc
    with handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield Record(str(path), number, "json", line, len(line))


def _text_records(path: Path, named: bool, warn: Warn) -> Iterator[Record]:
    data = read_file_bytes(path)
    offset = looks_binary(data)
    if offset is not None:
        if not named:
            warn(f"skipped {path}: a binary file (a NUL byte at offset {offset})")
            return
        warn(f"{path} does not look like text (a NUL byte at offset {offset}); reading its bytes")
    yield Record(str(path), 0, "text", data, len(data))


def _pyarrow() -> Any:  # the module, imported only when a table is read
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError as exc:
        raise UserError("reading parquet / arrow needs pyarrow: pip install 'mtp-cli[data]'"
                        ) from exc
    return pyarrow


def _table_records(file: InputFile, key: str) -> Iterator[Record]:
    """Rows of a Parquet or Arrow IPC file, batch by batch; progress is the byte position."""
    pa = _pyarrow()
    path = str(file.path)
    try:
        if file.kind == "parquet":
            table = pa.parquet.ParquetFile(path)
            names, rows = table.schema_arrow.names, table.metadata.num_rows
            batches = table.iter_batches(batch_size=BATCH_ROWS, columns=[key]) \
                if key in names else iter(())
        else:
            source = pa.memory_map(path)
            try:
                reader, rows = pa.ipc.open_stream(source), None  # what datasets writes
                batches = reader
            except pa.ArrowInvalid:  # the IPC file format: batches by number
                reader = pa.ipc.open_file(pa.memory_map(path))
                batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
                rows = sum(b.num_rows for b in batches)  # zero-copy views of the map
            names = reader.schema.names
    except (OSError, pa.ArrowException) as exc:
        raise UserError(problems=[Problem(f"cannot read as {file.kind}: {exc}", file=path)]
                        ) from exc
    if key not in names:
        raise UserError(problems=[Problem(f"no column '{key}' (columns: {', '.join(names)})",
                                          file=path, hint="choose one with --json-key")])
    row, done = 0, 0
    for batch in batches:
        values = batch.column(batch.schema.get_field_index(key)).to_pylist()
        target = file.size * (row + len(values)) // rows if rows else source.tell()
        share, extra = divmod(max(target - done, 0), max(len(values), 1))
        for i, value in enumerate(values):
            row += 1
            yield Record(path, row, "value", value, share + (extra if i == 0 else 0))
        done = max(target, done)


def iter_records(files: list[InputFile], key: str, named: set[Path], warn: Warn
                 ) -> Iterator[Record]:
    """Every record of `files`, in order (see the module docstring)."""
    for file in files:
        if file.kind == "jsonl":
            yield from _jsonl_records(file.path)
        elif file.kind in ("parquet", "arrow"):
            yield from _table_records(file, key)
        else:
            yield from _text_records(file.path, file.path in named, warn)
