"""Memory-mapped indexed datasets: the same windows as the in-memory reader, and the index cache
(reused on a second start, rebuilt when a file changes, never a half-written entry)."""

from __future__ import annotations

import os

import pytest
import torch

from mtp_cli.data import build_datasets, read_indexed_dataset, write_indexed_dataset
from mtp_cli.data.datasets import split_stream
from mtp_cli.data.index_cache import CACHE_DIR_NAME
from mtp_cli.data.indexed import IndexedDocuments
from mtp_cli.data.mapped import MappedStream
from mtp_cli.data.windows import TokenStream, TokenWindows
from tests.data_helpers import EOD, make_spec


def random_documents(count: int, seed: int) -> list[list[int]]:
    """Documents of 0..40 tokens below EOD; every fifth ends with EOD (as with --append-eod)."""
    generator = torch.Generator().manual_seed(seed)
    documents = []
    for i in range(count):
        length = int(torch.randint(0, 41, (1,), generator=generator))
        document = torch.randint(0, EOD, (length,), generator=generator).tolist()
        documents.append([*document, EOD] if i % 5 == 0 else document)
    return documents


def in_memory_windows(prefix, fraction: float, seq_length: int):
    """Today's reader: the whole .bin into memory, one TokenStream, split, windows."""
    tokens, lengths = read_indexed_dataset(prefix)
    stream = TokenStream.from_documents(tokens, lengths, EOD)
    train, val = split_stream(stream, fraction, seq_length, "test")
    return TokenWindows(train, seq_length), TokenWindows(val, seq_length)


def all_windows(windows: TokenWindows) -> list[list[int]]:
    return [windows[i].tolist() for i in range(len(windows))]


@pytest.mark.parametrize("dtype", [torch.uint16, torch.int32])
@pytest.mark.parametrize("fraction, seq_length, count", [
    (0.0, 8, 60), (0.1, 8, 60), (0.3, 5, 40),
    (0.2, 300, 40),  # too few documents for a window each side: the split falls back to tokens
])
def test_mapped_windows_equal_the_in_memory_reader(tmp_path, dtype, fraction, seq_length, count):
    write_indexed_dataset(tmp_path / "ds", random_documents(count, seed=count), dtype=dtype)
    expected_train, expected_val = in_memory_windows(tmp_path / "ds", fraction, seq_length)
    spec = make_spec(path=str(tmp_path / "ds"), seq_length=seq_length, val_fraction=fraction)
    train, val = build_datasets(spec)
    assert isinstance(train.stream, MappedStream)
    assert len(train) == len(expected_train) > 0 and len(val) == len(expected_val)
    assert all_windows(train) == all_windows(expected_train)
    assert all_windows(val) == all_windows(expected_val)


def test_mapped_tokens_keep_the_stored_dtype_and_windows_widen(tmp_path):
    write_indexed_dataset(tmp_path / "ds", random_documents(30, seed=1), dtype=torch.uint16)
    train, _ = build_datasets(make_spec(path=str(tmp_path / "ds")))
    assert train.stream.tokens.dtype == torch.uint16
    assert train[0].dtype == torch.int64


def test_slice_cut_on_an_eod_and_inside_a_document():
    # documents [1 2 3]+EOD, [4 5]+EOD, [6 7 8 9] (ends without EOD flag: given as data)
    tokens = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9], dtype=torch.int32)
    stream = MappedStream(tokens, torch.tensor([0, 3, 5]), torch.tensor([3, 2, 4]),
                          torch.tensor([True, True, True]), EOD)
    whole = [1, 2, 3, EOD, 4, 5, EOD, 6, 7, 8, 9, EOD]
    assert stream.read(0, len(stream)).tolist() == whole
    for start in range(len(whole)):
        for stop in range(start + 1, len(whole) + 1):
            part = stream.slice(start, stop)
            assert part.read(0, len(part)).tolist() == whole[start:stop], (start, stop)


def cache_entries(tmp_path):
    return sorted((tmp_path / CACHE_DIR_NAME).glob("*.pt"))


def test_index_cache_is_reused_then_rebuilt_when_a_file_changes(tmp_path, monkeypatch):
    write_indexed_dataset(tmp_path / "ds", random_documents(50, seed=2))
    spec = make_spec(path=str(tmp_path / "ds"), val_fraction=0.1)
    first, _ = build_datasets(spec)
    assert len(cache_entries(tmp_path)) == 1
    builds = []
    original = IndexedDocuments.scan
    monkeypatch.setattr(IndexedDocuments, "scan",
                        lambda self: builds.append(1) or original(self))
    again, _ = build_datasets(spec)
    assert builds == [] and all_windows(again) == all_windows(first)
    bin_path = tmp_path / "ds.bin"
    stat = bin_path.stat()
    os.utime(bin_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: key changes
    build_datasets(spec)
    assert builds == [1] and len(cache_entries(tmp_path)) == 2


def test_a_killed_build_leaves_nothing_that_is_used(tmp_path, monkeypatch):
    write_indexed_dataset(tmp_path / "ds", random_documents(50, seed=3))
    spec = make_spec(path=str(tmp_path / "ds"), val_fraction=0.1)

    def killed(path, entry):  # dies half way through writing the temporary file
        (path.with_name(path.name + ".999.tmp")).write_bytes(b"PK\x03\x04 half")
        raise KeyboardInterrupt

    monkeypatch.setattr("mtp_cli.data.index_cache._save", killed)
    with pytest.raises(KeyboardInterrupt):
        build_datasets(spec)
    assert cache_entries(tmp_path) == []
    monkeypatch.undo()
    train, _ = build_datasets(spec)  # built afresh, the leftover ignored
    assert len(cache_entries(tmp_path)) == 1
    expected, _ = in_memory_windows(tmp_path / "ds", 0.1, 8)
    assert all_windows(train) == all_windows(expected)


def test_a_damaged_entry_is_rebuilt_not_used(tmp_path):
    write_indexed_dataset(tmp_path / "ds", random_documents(50, seed=4))
    spec = make_spec(path=str(tmp_path / "ds"), val_fraction=0.1)
    build_datasets(spec)
    [entry] = cache_entries(tmp_path)
    entry.write_bytes(entry.read_bytes()[:100])
    train, _ = build_datasets(spec)
    expected, _ = in_memory_windows(tmp_path / "ds", 0.1, 8)
    assert all_windows(train) == all_windows(expected)
    assert len(entry.read_bytes()) > 100
