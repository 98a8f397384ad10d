"""`.idx`/`.bin` round trips against files Megatron-Core 0.19.2's own `IndexedDatasetBuilder`
wrote (tests/data/megatron_indexed/, made by make.py there): dtype codes 8 (uint16) and 4
(int32, the builder's default), a document of two sequences included."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtp_cli.data import build_datasets, read_indexed_dataset, write_indexed_dataset
from mtp_cli.data.indexed import open_indexed_dataset
from tests.data_helpers import EOD, make_spec

HERE = Path(__file__).parent / "data" / "megatron_indexed"
DOCUMENTS = [[5, 6, 7], [300, 1], [9, 9, 9, 9, 256], [42], [60000, 2, 3]]  # as make.py wrote
LAST = [11, 12, 13, 14, 15]  # the two-sequence document [11, 12] + [13, 14, 15]


@pytest.mark.parametrize("name, dtype, code", [("uint16", torch.uint16, 8),
                                               ("int32", torch.int32, 4)])
def test_reads_what_megatron_wrote(name, dtype, code):
    assert (HERE / f"{name}.idx").read_bytes()[17] == code  # the dtype byte after magic+version
    tokens, lengths = read_indexed_dataset(HERE / name)
    assert tokens.tolist() == [t for d in DOCUMENTS for t in d] + LAST
    assert lengths.tolist() == [len(d) for d in DOCUMENTS] + [len(LAST)]
    mapped = open_indexed_dataset(HERE / name)
    assert mapped is not None and mapped.tokens.dtype == dtype
    assert mapped.lengths.tolist() == lengths.tolist()
    assert [mapped.tokens[s:s + n].to(torch.int64).tolist()
            for s, n in zip(mapped.starts.tolist(), mapped.lengths.tolist(), strict=True)
            ] == [*DOCUMENTS, LAST]


@pytest.mark.parametrize("name, dtype", [("single_uint16", torch.uint16),
                                         ("single_int32", torch.int32)])
def test_writes_byte_for_byte_what_megatron_writes(tmp_path, name, dtype):
    write_indexed_dataset(tmp_path / "ours", DOCUMENTS, dtype=dtype)
    for suffix in (".bin", ".idx"):
        ours = (tmp_path / f"ours{suffix}").read_bytes()
        assert ours == (HERE / f"{name}{suffix}").read_bytes(), suffix


def test_trains_on_megatrons_file_with_eod_between_documents(tmp_path):
    for suffix in (".bin", ".idx"):  # a copy: the index cache goes beside the data
        (tmp_path / f"ds{suffix}").write_bytes((HERE / f"uint16{suffix}").read_bytes())
    train, _ = build_datasets(make_spec(path=str(tmp_path / "ds"), seq_length=4,
                                        vocab_size=60001))
    expected = []
    for document in [*DOCUMENTS, LAST]:
        expected += document if document[-1] == EOD else [*document, EOD]
    assert train.stream.read(0, len(train.stream)).tolist() == expected
