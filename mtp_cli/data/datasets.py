"""`build_datasets(spec)`: the training and validation windows of a run.

A Megatron indexed dataset is memory-mapped (`mapped.py`), its split cached on disk
(`index_cache.py`); `data.blend` combines several corpora (`blend.py`). Any other corpus is read
and tokenized once per call; the default corpus's split is cached in memory
per process, so training and validation, or a second call, never read it twice. It is split by
document: document i goes to validation when `floor((i+1) f) > floor(i f)` for
`f = data.val_fraction`, which spreads validation documents evenly over the corpus (every 20th
for f = 0.05). When that leaves either side shorter than one window (a single large text file,
say), the split falls back to tokens: validation is the last `max(ceil(f n), seq_length + 1)`
tokens of the stream. `val_fraction: 0` gives an empty validation set (length 0).
`data.synthetic` replaces all of this by generated splits (synthetic.py).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from mtp_cli.config.schema import RunSpec
from mtp_cli.data.blend import BlendedWindows, BlendPart, blending_indices, normalized
from mtp_cli.data.corpus import Warn, ignore_warning, path_documents, stdlib_documents
from mtp_cli.data.documents import Document
from mtp_cli.data.index_cache import cache_dir_for, cache_key, cached
from mtp_cli.data.indexed import (
    indexed_files,
    indexed_prefix,
    open_indexed_dataset,
    read_indexed_dataset,
)
from mtp_cli.data.mapped import MappedStream
from mtp_cli.data.synthetic import synthetic_stream
from mtp_cli.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from mtp_cli.data.windows import TokenStream, TokenWindows
from mtp_cli.errors import Problem, UserError

_DEFAULT_SPLIT_CACHE: dict[tuple[str, float, int], tuple[TokenStream, TokenStream]] = {}
_SYNTHETIC_CACHE: dict[tuple[str, int], tuple[TokenStream, TokenStream]] = {}


def _data_error(message: str) -> UserError:
    return UserError(problems=[Problem(message, key="data.path")])


def _tokenize(documents: list[Document], tokenizer: ByteTokenizer | HFTokenizer) -> TokenStream:
    if isinstance(tokenizer, ByteTokenizer):  # fast path: one buffer, no per-document tensors
        contents = [doc.as_bytes() for doc in documents]
        lengths = torch.tensor([len(c) for c in contents], dtype=torch.int64)
        joined = bytearray(b"".join(contents))
        flat = torch.frombuffer(joined, dtype=torch.uint8) if joined else torch.zeros(
            0, dtype=torch.uint8)
        return TokenStream.from_documents(flat, lengths, tokenizer.eod)
    encoded = tokenizer.encode_documents(documents)
    lengths = torch.tensor([len(e) for e in encoded], dtype=torch.int64)
    flat = torch.cat(encoded) if encoded else torch.zeros(0, dtype=torch.int64)
    return TokenStream.from_documents(flat, lengths, tokenizer.eod)


def _resolved(path: str) -> str:
    """`path` as the user wrote it and, when relative, where that is."""
    resolved = Path(path).resolve()
    return path if str(resolved) == path else f"{path} (resolved to {resolved})"


def load_token_stream(path: str | None, tokenizer: ByteTokenizer | HFTokenizer, *,
                      warn: Warn | None = None) -> TokenStream:
    """Every document of `data.path` (None: the standard library), tokenized, EOD-separated.
    `warn` hears about files that were skipped or do not look like text."""
    if path is None:
        return _tokenize(stdlib_documents(), tokenizer)
    prefix = indexed_prefix(path)
    if prefix is not None:
        tokens, lengths = read_indexed_dataset(prefix)
        return TokenStream.from_documents(tokens, lengths, tokenizer.eod)
    if not Path(path).exists():
        dangling = " (a dangling link)" if Path(path).is_symlink() else ""
        raise _data_error(f"{_resolved(path)} does not exist{dangling}")
    return _tokenize(path_documents(Path(path), warn or ignore_warning), tokenizer)


def _check_ids(stream: TokenStream, vocab_size: int, where: str) -> None:
    if not len(stream):
        return
    _check_id_range(int(stream.tokens.min()), int(stream.tokens.max()), vocab_size, where)


def _check_id_range(low: int, high: int, vocab_size: int, where: str) -> None:
    if low < 0 or high >= vocab_size:
        raise UserError(problems=[Problem(
            f"{where}: token ids range over [{low}, {high}], outside model.vocab_size "
            f"({vocab_size})", key="data.path")])


def validation_documents(num_documents: int, fraction: float) -> torch.Tensor:
    """Boolean mask of the documents held out: evenly spread, `fraction` of them."""
    index = torch.arange(num_documents, dtype=torch.float64)
    return torch.floor((index + 1) * fraction) > torch.floor(index * fraction)


Stream = TokenStream | MappedStream


def _empty_stream(eod: int) -> TokenStream:
    return TokenStream(torch.zeros(0, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), eod)


def split_stream(stream: Stream, fraction: float, seq_length: int, where: str
                 ) -> tuple[Stream, Stream]:
    """(train, validation) streams; see the module docstring for the rule."""
    window, total = seq_length + 1, len(stream)
    if total < window:
        raise _data_error(f"{where}: the corpus ({total} tokens) is shorter than one window "
                          f"(model.seq_length + 1 = {window} tokens)")
    empty = _empty_stream(stream.eod)
    if fraction == 0:
        return stream, empty
    held_out = validation_documents(stream.num_documents, fraction)
    documents = torch.arange(stream.num_documents)
    train, val = stream.subset(documents[~held_out]), stream.subset(documents[held_out])
    if len(train) >= window and len(val) >= window:
        return train, val
    val_tokens = max(math.ceil(fraction * total), window)
    if total - val_tokens >= window:
        return stream.slice(0, total - val_tokens), stream.slice(total - val_tokens, total)
    raise _data_error(
        f"{where}: the corpus ({total} tokens) cannot give a training and a validation window "
        f"of {window} tokens each; set data.val_fraction: 0 to train without validation")


@contextmanager
def _single_threaded() -> Iterator[None]:
    """Run torch ops on one thread: the corpus is copied a few times in large ops, which on a
    busy machine (every `--nproc` worker builds its corpus at once) are several times faster
    without intra-op threads waiting for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


Windows = TokenWindows | BlendedWindows


def build_datasets(spec: RunSpec, *, warn: Warn | None = None) -> tuple[Windows, Windows]:
    """(train, validation) windows of `spec.data` (a blend's: `blend.py`); UserError for any unusable corpus. `warn`
    hears about skipped or binary files (the launcher prints them; workers stay quiet)."""
    with _single_threaded():
        return _build_datasets(spec, warn)


def _build_datasets(spec: RunSpec, warn: Warn | None = None) -> tuple[Windows, Windows]:
    data = spec.data
    tokenizer = load_tokenizer(data.tokenizer, spec.model.vocab_size)
    if data.synthetic is not None:
        return _synthetic_datasets(spec, tokenizer.eod)
    if data.blend is None:
        return _path_datasets(data.path, spec, tokenizer, warn)
    train_parts, val_parts = [], []
    for entry in data.blend:
        train, val = _path_datasets(entry.path, spec, tokenizer, warn)
        train_parts.append(BlendPart(_resolved(entry.path), entry.weight, train))
        val_parts.append(BlendPart(_resolved(entry.path), entry.weight, val))
    val_parts = [part for part in val_parts if len(part.windows)]  # val_fraction 0, or tiny
    size = spec.train.steps * spec.train.global_batch_size  # what training reads
    weights = [part.weight for part in train_parts]
    directory = cache_dir_for(Path(data.blend[0].path))
    key = cache_key([], kind="blend", weights=normalized(weights), size=size)
    entry, _ = cached(directory, key, lambda: dict(zip(
        ("dataset_index", "sample_index"), blending_indices(weights, size), strict=True)))
    seed = spec.train.seed
    train = BlendedWindows(train_parts, size, seed=seed, shuffle=True,
                           indices=(entry["dataset_index"], entry["sample_index"]))
    if not val_parts:
        return train, TokenWindows(_empty_stream(tokenizer.eod), spec.model.seq_length)
    val_size = sum(len(part.windows) for part in val_parts)
    return train, BlendedWindows(val_parts, val_size, seed=seed, shuffle=False)


def _path_datasets(path: str | None, spec: RunSpec, tokenizer: ByteTokenizer | HFTokenizer,
                   warn: Warn | None) -> tuple[TokenWindows, TokenWindows]:
    """(train, validation) windows of one corpus (`data.path`, or one dataset of a blend)."""
    data, model = spec.data, spec.model
    where = _resolved(path) if path is not None else "the default corpus (standard library)"
    key = (tokenizer.name, data.val_fraction, model.seq_length)
    if path is None and key in _DEFAULT_SPLIT_CACHE:
        train, val = _DEFAULT_SPLIT_CACHE[key]
        return TokenWindows(train, model.seq_length), TokenWindows(val, model.seq_length)
    if path is not None and indexed_prefix(path) is not None:
        mapped = _indexed_split(path, tokenizer.eod, data.val_fraction, model.seq_length,
                                model.vocab_size, where)
        if mapped is not None:
            return TokenWindows(mapped[0], model.seq_length), TokenWindows(mapped[1],
                                                                           model.seq_length)
    stream = load_token_stream(path, tokenizer, warn=warn)
    if not len(stream):
        raise _data_error(f"{where}: empty corpus (no document has any text)")
    _check_ids(stream, model.vocab_size, where)
    train, val = split_stream(stream, data.val_fraction, model.seq_length, where)
    if path is None:
        _DEFAULT_SPLIT_CACHE[key] = (train, val)
    return TokenWindows(train, model.seq_length), TokenWindows(val, model.seq_length)


def _synthetic_datasets(spec: RunSpec, eod: int) -> tuple[TokenWindows, TokenWindows]:
    """`data.synthetic`'s generated splits (cached per process, like the default corpus)."""
    config, seq = spec.data.synthetic, spec.model.seq_length
    assert config is not None
    key = (config.model_dump_json(), seq)
    if key not in _SYNTHETIC_CACHE:
        _SYNTHETIC_CACHE[key] = (synthetic_stream(config, seq, "train", eod),
                                 synthetic_stream(config, seq, "val", eod))
    train, val = _SYNTHETIC_CACHE[key]
    return TokenWindows(train, seq), TokenWindows(val, seq)


def data_fingerprint(spec: RunSpec) -> int:
    """A 52-bit hash of what the data stream depends on: the data paths (or the blend) and
    their files' sizes and modification times, the split and the tokenizer. Stored with the
    loader's position so that a resume on changed data is named, not silently misplaced."""
    data = spec.data
    sources = [(data.path, 1.0)] if data.blend is None else [
        (entry.path, entry.weight) for entry in data.blend]
    files: list[Path] = []
    for path, _ in sources:
        if path is None:
            continue
        if indexed_prefix(path) is not None:
            files += list(indexed_files(path))
        elif Path(path).is_dir():
            files += sorted(Path(d, f) for d, _, names in os.walk(path) for f in names)
        elif Path(path).exists():
            files.append(Path(path))
    key = cache_key(files, kind="fingerprint", sources=sources, split=data.val_fraction,
                    tokenizer=data.tokenizer)
    return int(key[:13], 16)


def _indexed_split(path: str, eod: int, fraction: float, seq_length: int, vocab_size: int,
                   where: str) -> tuple[MappedStream, MappedStream] | None:
    """(train, validation) streams over the memory-mapped `.bin`, their document tables and the
    id range from the index cache (built once: `index_cache`); None for a dataset whose
    documents are not stored back to back (read into memory instead)."""
    documents = open_indexed_dataset(path)  # the .idx is checked against the .bin first
    if documents is None:
        return None

    def build() -> dict[str, torch.Tensor]:
        stream, (low, high) = MappedStream.from_indexed(documents, eod)
        if not len(stream):
            raise _data_error(f"{where}: empty corpus (no document has any text)")
        _check_id_range(low, high, vocab_size, where)
        train, val = split_stream(stream, fraction, seq_length, where)
        entry = {"id_range": torch.tensor([low, high])}
        for name, part in (("train", train), ("val", val)):
            table = part.table() if isinstance(part, MappedStream) else {
                "start": torch.zeros(0, dtype=torch.int64),
                "length": torch.zeros(0, dtype=torch.int64),
                "eod_after": torch.zeros(0, dtype=torch.bool)}
            entry.update({f"{name}.{k}": v for k, v in table.items()})
        return entry

    files = list(indexed_files(path))
    key = cache_key(files, kind="split", eod=eod, val_fraction=fraction, seq_length=seq_length)
    entry, _ = cached(cache_dir_for(files[1]), key, build)
    _check_id_range(int(entry["id_range"][0]), int(entry["id_range"][1]), vocab_size, where)
    train, val = (MappedStream(documents.tokens, entry[f"{n}.start"], entry[f"{n}.length"],
                               entry[f"{n}.eod_after"], eod) for n in ("train", "val"))
    return train, val
