"""`mtp data prepare`: tokenize corpora into Megatron's `.bin`/`.idx`, in parallel, streaming.

What Megatron-LM's `tools/preprocess_data.py` does, with three differences that matter at
scale: memory stays bounded (records are read lazily and at most `2 x workers + 2` chunks are in
flight: `Pool.imap` would read the whole input ahead of slow workers; the writer streams the
index), a bad record is named by file and line (and skipped or refused, as asked) instead of
ending the run with a traceback, and an interrupted run leaves nothing that looks complete
(`indexed_writer`). The output's order is the input's: chunks are submitted in order and their
results consumed in order.

Tokens are those of the in-process pipeline (`tokenizer.py`): `bytes` maps byte i to id i with
end-of-document 256; a `tokenizer.json` encodes without special tokens, with the EOD id of
`HFTokenizer`. `append_eod` appends that id after every non-empty document (Megatron's
`--append-eod`; an empty document stays empty: the in-process pipeline drops it).
The `.bin` dtype is Megatron's choice for the vocabulary: uint16 below 65,500 ids, else int32.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mtp_cli.data.indexed_writer import IndexedDatasetWriter, optimal_dtype, token_bytes
from mtp_cli.data.prepare_sources import Record, expand_inputs, iter_records
from mtp_cli.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from mtp_cli.errors import Problem, UserError, yaml_kind

CHUNK_BYTES = 1 << 20  # records are sent to workers in chunks of about this much input
CHUNK_RECORDS = 2048
BAD_RECORD_POLICIES = ("skip", "fail")
KEPT_PROBLEMS = 20  # bad records named in the summary when skipped (the rest are counted)
# Workers are forked where the platform can (they start at once: "spawn" would import torch again
# in each, ~2-7 s here); the parent has run no tokenizer batch and no torch kernel, so no thread
# pool is copied half-held. Callers must not run threads of their own (the CLI's progress bar
# is refreshed from the progress callback, not by a thread).
START_METHOD = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


@dataclass
class Progress:
    """Running totals, reported after every chunk (the CLI draws them as a progress bar)."""

    total_bytes: int
    bytes_done: int = 0
    documents: int = 0
    tokens: int = 0
    skipped: int = 0


@dataclass
class PrepareSummary:
    """What a prepare wrote: counts, sizes, rates and the bad records it skipped."""

    bin_path: str
    idx_path: str
    inputs: int  # files read
    documents: int
    tokens: int
    skipped: int
    input_bytes: int
    bin_bytes: int
    dtype: str
    tokenizer: str
    eod: int
    append_eod: bool
    workers: int
    seconds: float
    skipped_records: list[str] = field(default_factory=list)  # the first KEPT_PROBLEMS

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / 1e6 / max(self.seconds, 1e-9)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "mb_per_s": round(self.mb_per_s, 2),
                "tokens_per_s": round(self.tokens_per_s)}


# ---- worker side: one tokenizer per process, set by `_start_worker` -------------------------

_WORKER: dict[str, object] = {}


def load_prepare_tokenizer(name: str) -> ByteTokenizer | HFTokenizer:
    """`bytes` or a `tokenizer.json`, loaded as training loads `data.tokenizer`."""
    if name == "bytes":
        return load_tokenizer(None, 1 << 31)
    if not Path(name).is_file():
        raise UserError(problems=[Problem("does not exist (or is not a file)", file=name,
                                          key="--tokenizer", hint="a tokenizer.json or 'bytes'")])
    return load_tokenizer(name, 1 << 31)


def _start_worker(tokenizer: str, key: str, append_eod: bool, dtype: torch.dtype) -> None:
    _WORKER.update(tokenizer=load_prepare_tokenizer(tokenizer), key=key, append_eod=append_eod,
                   dtype=dtype)


def _start_pool_worker(*init: object) -> None:
    """A pool worker ignores Ctrl-C: the parent hears it (the whole foreground group does),
    removes its temporary files and terminates the pool. Its tokenizer encodes on one thread:
    the workers are the parallelism (a thread pool in each would oversubscribe the cores)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _start_worker(*init)  # type: ignore[arg-type]


def _document_text(record: Record, key: str, as_bytes: bool) -> str | bytes:
    """The record's text (bytes for a text file read by the byte tokenizer); a ValueError
    says why the record is bad."""
    if record.kind == "json":
        try:
            value = json.loads(record.payload.decode("utf-8"))  # type: ignore[attr-defined]
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a JSON line: {exc}") from exc
        if not isinstance(value, dict) or key not in value:
            raise ValueError(f"expected a JSON object with a '{key}' field")
        value = value[key]
    elif record.kind == "value":
        value = record.payload
    else:
        if as_bytes:
            return record.payload  # type: ignore[return-value]
        try:
            return record.payload.decode("utf-8")  # type: ignore[attr-defined]
        except UnicodeDecodeError as exc:
            raise ValueError(f"not UTF-8 text (byte {exc.start}): a tokenizers tokenizer "
                             "needs text") from exc
    if not isinstance(value, str):
        raise ValueError(f"'{key}' must be a string, got {yaml_kind(value)}")
    return value


def _byte_tokens(raw: bytes, dtype: torch.dtype) -> bytes:
    """Byte tokens in `.bin` bytes without a Python loop: each byte, zero-extended (LE)."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    out = bytearray(itemsize * len(raw))
    out[0::itemsize] = raw
    return bytes(out)


def encode_chunk(records: list[Record]) -> tuple[list[tuple[bytes, int]], list[Problem], int]:
    """([(document's .bin bytes, its token count)], bad records, input bytes) of one chunk."""
    tokenizer, key = _WORKER["tokenizer"], str(_WORKER["key"])
    dtype: torch.dtype = _WORKER["dtype"]  # type: ignore[assignment]
    eod = [tokenizer.eod] if _WORKER["append_eod"] else []  # type: ignore[attr-defined]
    as_bytes = isinstance(tokenizer, ByteTokenizer)
    texts: list[str | bytes] = []
    problems: list[Problem] = []
    for record in records:
        try:
            texts.append(_document_text(record, key, as_bytes))
        except ValueError as exc:
            file, line = record.where()
            row = f"row {record.line}: " if record.kind == "value" else ""
            problems.append(Problem(f"{row}{exc}", file=file, line=line))
    if as_bytes:
        raws = [t if isinstance(t, bytes) else t.encode("utf-8") for t in texts]
        tail = token_bytes(eod, dtype)
        encoded = [(_byte_tokens(raw, dtype) + tail, len(raw) + len(eod)) if raw else (b"", 0)
                   for raw in raws]
    else:
        ids = tokenizer.encode_ids(texts)  # type: ignore[attr-defined]
        encoded = [(token_bytes(doc + eod, dtype), len(doc) + len(eod)) if doc else (b"", 0)
                   for doc in ids]
    return encoded, problems, sum(r.nbytes for r in records)


# ---- reading side --------------------------------------------------------------------------

def _chunks(records: Iterable[Record]) -> Iterator[list[Record]]:
    chunk: list[Record] = []
    size = 0
    for record in records:
        chunk.append(record)
        size += record.nbytes
        if size >= CHUNK_BYTES or len(chunk) >= CHUNK_RECORDS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _results(chunks: Iterator[list[Record]], workers: int, init: tuple
             ) -> Iterator[tuple[list[tuple[bytes, int]], list[Problem], int]]:
    """Encoded chunks in input order: in this process, or in `workers` processes with
    at most 2 x workers + 2 chunks in flight (bounded memory; `Pool.imap` reads ahead)."""
    if workers == 1:
        _start_worker(*init)
        yield from map(encode_chunk, chunks)
        return
    context = multiprocessing.get_context(START_METHOD)
    with context.Pool(workers, initializer=_start_pool_worker, initargs=init) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(encode_chunk, (chunk,)))
            if len(pending) >= 2 * workers + 2:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def prepare(inputs: list[str | Path], tokenizer: str, out: str | Path, *, workers: int = 1,
            append_eod: bool = False, json_key: str = "text", on_bad_record: str = "fail",
            overwrite: bool = False, warn: Callable[[str], None] = lambda _: None,
            on_progress: Callable[[Progress], None] = lambda _: None) -> PrepareSummary:
    """Tokenize `inputs` into `out.bin` / `out.idx` (see the module docstring)."""
    if on_bad_record not in BAD_RECORD_POLICIES:
        raise UserError(f"--on-bad-record: '{on_bad_record}' is not one of skip, fail")
    if workers < 1:
        raise UserError(f"--workers: {workers} (at least 1)")
    out = Path(out)
    existing = [p for p in (out.with_name(out.name + s) for s in (".bin", ".idx")) if p.exists()]
    if existing and not overwrite:
        raise UserError(problems=[Problem("exists (pass --overwrite to replace it)",
                                          file=str(existing[0]))])
    if not out.parent.is_dir():
        raise UserError(problems=[Problem("no such directory", file=str(out.parent),
                                          key="--out")])
    paths = [Path(p) for p in inputs]
    files = expand_inputs(paths, warn)
    loaded = load_prepare_tokenizer(tokenizer)
    dtype = optimal_dtype(loaded.vocab_size)
    progress = Progress(total_bytes=sum(f.size for f in files))
    kept: list[str] = []
    start = time.perf_counter()
    writer = IndexedDatasetWriter(out, dtype)
    try:
        chunks = _chunks(iter_records(files, json_key, set(paths), warn))
        for encoded, problems, nbytes in _results(chunks, workers,
                                                  (tokenizer, json_key, append_eod, dtype)):
            if problems and on_bad_record == "fail":
                raise UserError(problems=[problems[0]])
            for data, count in encoded:
                writer.add_encoded(data, count)
            progress.skipped += len(problems)
            kept += [p.render() for p in problems[:KEPT_PROBLEMS - len(kept)]]
            progress.bytes_done += nbytes
            progress.documents, progress.tokens = writer.documents, writer.tokens
            on_progress(progress)
        writer.finalize()
    except BaseException:
        writer.abort()
        raise
    return PrepareSummary(
        bin_path=str(writer.bin_path), idx_path=str(writer.idx_path), inputs=len(files),
        documents=writer.documents, tokens=writer.tokens, skipped=progress.skipped,
        input_bytes=progress.bytes_done, bin_bytes=writer.bin_path.stat().st_size,
        dtype=str(dtype).removeprefix("torch."), tokenizer=loaded.name, eod=loaded.eod,
        append_eod=append_eod, workers=workers, seconds=time.perf_counter() - start,
        skipped_records=kept)
