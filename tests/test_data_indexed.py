"""Megatron indexed datasets (.bin/.idx, MMapIndexedDataset version 1): reader and writer."""

from __future__ import annotations

import struct

import pytest
import torch

from mtp_cli.data import build_datasets, read_indexed_dataset, write_indexed_dataset
from mtp_cli.errors import UserError
from tests.data_helpers import EOD, index_bytes, make_spec

DOCS = [[5, 6, 7], [300, 1], [9, 9, 9, 9, EOD], [42]]


@pytest.mark.parametrize("dtype, code, char", [
    (torch.int32, 4, "i"), (torch.uint16, 8, "H"), (torch.int64, 5, "q"),
])
def test_writer_produces_the_documented_layout(tmp_path, dtype, code, char):
    write_indexed_dataset(tmp_path / "ds", DOCS, dtype=dtype)
    size = struct.calcsize(char)
    lengths = [len(d) for d in DOCS]
    pointers = [sum(lengths[:i]) * size for i in range(len(DOCS))]
    assert (tmp_path / "ds.idx").read_bytes() == index_bytes(code, lengths, pointers,
                                                              [0, 1, 2, 3, 4])
    flat = [t for d in DOCS for t in d]
    assert (tmp_path / "ds.bin").read_bytes() == struct.pack(f"<{len(flat)}{char}", *flat)
    tokens, doc_lengths = read_indexed_dataset(tmp_path / "ds")
    assert tokens.tolist() == flat and doc_lengths.tolist() == lengths


def test_reader_joins_the_sequences_of_a_document_and_follows_pointers(tmp_path):
    # Three sequences stored out of order in .bin; documents = [seq0, seq1], [seq2].
    seqs = {0: [1, 2], 1: [3], 2: [4, 5, 6]}
    layout = [2, 0, 1]  # order in the .bin file
    data, pointers = b"", {}
    for s in layout:
        pointers[s] = len(data)
        data += struct.pack(f"<{len(seqs[s])}h", *seqs[s])
    (tmp_path / "x.bin").write_bytes(data)
    (tmp_path / "x.idx").write_bytes(index_bytes(
        3, [len(seqs[s]) for s in range(3)], [pointers[s] for s in range(3)], [0, 2, 3]))
    tokens, lengths = read_indexed_dataset(tmp_path / "x.idx")
    assert tokens.tolist() == [1, 2, 3, 4, 5, 6] and lengths.tolist() == [3, 3]


@pytest.mark.parametrize("name", ["ds", "ds.bin", "ds.idx"])
def test_build_datasets_reads_the_prefix_or_either_file_and_adds_eod_once(tmp_path, name):
    write_indexed_dataset(tmp_path / "ds", DOCS)
    train, _ = build_datasets(make_spec(path=str(tmp_path / name), seq_length=4))
    # The document already ending with EOD gets no second one.
    assert train.stream.read(0, len(train.stream)).tolist() == [5, 6, 7, EOD, 300, 1, EOD, 9, 9, 9, 9, EOD, 42, EOD]


def test_bad_index_header_version_and_truncation_are_user_errors(tmp_path):
    write_indexed_dataset(tmp_path / "ds", DOCS)
    idx = tmp_path / "ds.idx"
    good = idx.read_bytes()
    for broken, message in [
        (b"NOTANIDX\x00" + good[9:], "bad header"),
        (good[:9] + struct.pack("<Q", 2) + good[17:], "version 2"),
        (good[:17] + struct.pack("<B", 7) + good[18:], "dtype code 7"),
        (good[:40], "truncated"),
        (b"MMID", "shorter than the header"),
    ]:
        idx.write_bytes(broken)
        with pytest.raises(UserError, match=message) as info:
            build_datasets(make_spec(path=str(tmp_path / "ds"), seq_length=4))
        assert str(idx) in str(info.value)


def test_missing_bin_and_short_bin_are_user_errors(tmp_path):
    write_indexed_dataset(tmp_path / "ds", DOCS)
    data = (tmp_path / "ds.bin").read_bytes()
    (tmp_path / "ds.bin").write_bytes(data[:-4])
    with pytest.raises(UserError, match="points up to byte"):
        build_datasets(make_spec(path=str(tmp_path / "ds"), seq_length=4))
    (tmp_path / "ds.bin").unlink()
    with pytest.raises(UserError, match=r"ds\.bin: missing"):
        build_datasets(make_spec(path=str(tmp_path / "ds.idx"), seq_length=4))


def test_indexed_ids_beyond_the_vocabulary_are_rejected(tmp_path):
    write_indexed_dataset(tmp_path / "ds", [[1, 2, 3, 400]])
    with pytest.raises(UserError, match=r"\[1, 400\].*vocab_size \(320\)"):
        build_datasets(make_spec(path=str(tmp_path / "ds"), seq_length=2))


def test_huge_and_negative_ids_are_reported_not_wrapped(tmp_path):
    write_indexed_dataset(tmp_path / "big", [[1, 2**40, 3]], dtype=torch.int64)
    with pytest.raises(UserError, match=str(2**40)):
        build_datasets(make_spec(path=str(tmp_path / "big"), seq_length=2))
    write_indexed_dataset(tmp_path / "neg", [[1, -70000, 3]], dtype=torch.int32)
    with pytest.raises(UserError, match="-70000"):
        build_datasets(make_spec(path=str(tmp_path / "neg"), seq_length=2))
