"""Data paths that would hang, never end, or index out of bounds: FIFOs and links to /dev/zero
in a data directory are skipped with a warning (only regular files are read), named directly
they are refused; a crafted Megatron `.idx` is checked against its `.bin` before indexing.
Plus what a person needs to see: a binary file warns, a missing path shows where it resolved."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from mtp_cli.data import build_datasets
from mtp_cli.errors import UserError
from tests.data_helpers import index_bytes, make_spec
from tests.hostile_helpers import assert_refused, run_bounded, tree
from tests.train_helpers import TINY, make_corpus

TEXT = b"plain text, " * 40


def corpus_with_traps(root: Path) -> Path:
    root.mkdir()
    (root / "a.txt").write_bytes(TEXT)
    (root / "b.txt").write_bytes(TEXT)
    os.mkfifo(root / "pipe.txt")
    (root / "zero.txt").symlink_to("/dev/zero")
    return root


def test_special_files_in_a_data_directory_are_skipped(tmp_path):
    root = corpus_with_traps(tmp_path / "corpus")
    warnings: list[str] = []
    train, _ = build_datasets(make_spec(path=str(root)), warn=warnings.append)
    assert train.stream.num_documents == 2 and train.num_tokens == 2 * (len(TEXT) + 1)
    assert warnings == [
        f"data.path: skipped {root / 'pipe.txt'}: not a regular file (a FIFO, device or socket)",
        f"data.path: skipped {root / 'zero.txt'}: not a regular file (a FIFO, device or socket)",
    ]


@pytest.mark.parametrize("name", ["pipe.txt", "zero.txt"])
def test_special_file_named_as_data_path_is_refused(tmp_path, name):
    root = corpus_with_traps(tmp_path / "corpus")
    with pytest.raises(UserError, match="cannot read: not a regular file"):
        build_datasets(make_spec(path=str(root / name)))


@pytest.mark.slow
def test_train_reads_a_trapped_directory_without_hanging(tmp_path):
    """Through the CLI, bounded: the warnings come out, and a run directory that cannot be
    created refuses the launch right after the data was read."""
    root = make_corpus(tmp_path / "corpus")
    os.mkfifo(root / "pipe.txt")
    (root / "zero.txt").symlink_to("/dev/zero")
    (tmp_path / "file").write_text("x")
    outcome = run_bounded("train", "specs/tiny.yaml", *TINY, f"data.path={root}", "--run-dir",
                          str(tmp_path / "file" / "run"), timeout=120)
    text = assert_refused(outcome, "is not a directory")
    assert f"warning: data.path: skipped {root / 'pipe.txt'}" in text
    assert f"warning: data.path: skipped {root / 'zero.txt'}" in text


def test_binary_files_warn(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.txt").write_bytes(TEXT)
    (root / "b.dat").write_bytes(b"\x7fELF\x00\x01" + TEXT)
    warnings: list[str] = []
    build_datasets(make_spec(path=str(root)), warn=warnings.append)
    assert warnings == [f"data.path: skipped 1 binary file(s) (a NUL byte in the first 8 KiB): "
                        f"{root / 'b.dat'}"]
    warnings.clear()
    train, _ = build_datasets(make_spec(path=str(root / "b.dat")), warn=warnings.append)
    assert warnings == [f"data.path: {root / 'b.dat'} does not look like text (a NUL byte at "
                        "offset 4); training on its raw bytes"]
    assert train.num_tokens == len(TEXT) + 6 + 1


def test_missing_data_path_shows_where_it_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as caught:
        build_datasets(make_spec(path="data/corpus"))
    assert str(caught.value) == (f"data.path: data/corpus (resolved to "
                                 f"{tmp_path / 'data' / 'corpus'}) does not exist")


# --- crafted Megatron indexes ----------------------------------------------------------------
def write_crafted(tmp_path: Path, lengths, pointers, documents, tokens: int = 8) -> Path:
    (tmp_path / "ds.bin").write_bytes(struct.pack(f"<{tokens}i", *range(tokens)))
    (tmp_path / "ds.idx").write_bytes(index_bytes(4, lengths, pointers, documents))
    return tmp_path / "ds"


@pytest.mark.parametrize(("lengths", "pointers", "needle"), [
    ([2, 2], [0, 2**62], "a sequence pointer (4,611,686,018,427,387,904) lies past the end of "
                         "ds.bin (32 bytes)"),
    ([2, 2], [0, 2**63 - 4], "lies past the end of ds.bin"),  # pointer + length wraps int64
    ([2, 2**31 - 1], [0, 8], "a sequence length (2,147,483,647 tokens) is longer than all of "
                             "ds.bin (32 bytes)"),
    ([8] * 1000, [0] * 1000, "its sequences add up to 32,000 bytes, more than ds.bin holds "
                             "(32): they overlap"),
])
def test_crafted_index_is_refused_naming_the_file(tmp_path, lengths, pointers, needle):
    prefix = write_crafted(tmp_path, lengths, pointers, list(range(len(lengths) + 1)))
    with pytest.raises(UserError) as caught:
        build_datasets(make_spec(path=str(prefix), seq_length=2))
    (problem,) = caught.value.problems
    assert problem.file == str(tmp_path / "ds.idx") and needle in problem.message


def test_index_header_promising_more_than_it_holds_in_process(tmp_path):
    (tmp_path / "ds.bin").write_bytes(b"\x00" * 32)
    header = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 4, 2**60, 2**60 + 1)
    (tmp_path / "ds.idx").write_bytes(header)
    with pytest.raises(UserError, match="truncated: 34 bytes, the header promises"):
        build_datasets(make_spec(path=str(tmp_path / "ds"), seq_length=2))


@pytest.mark.slow
def test_index_header_promising_more_than_it_holds(tmp_path):
    (tmp_path / "ds.bin").write_bytes(b"\x00" * 32)
    header = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 4, 2**60, 2**60 + 1)
    (tmp_path / "ds.idx").write_bytes(header)
    outcome = run_bounded("train", "specs/tiny.yaml", *TINY, f"data.path={tmp_path / 'ds'}",
                          "--run-dir", str(tmp_path / "run"))
    assert_refused(outcome, f"{tmp_path / 'ds.idx'}: not a Megatron indexed dataset index: "
                            "truncated")
    assert tree(tmp_path) == ["ds.bin", "ds.idx"]


@pytest.mark.slow
def test_crafted_index_through_the_cli(tmp_path):
    write_crafted(tmp_path, [2, 2], [0, 2**62], [0, 1, 2])
    outcome = run_bounded("train", "specs/tiny.yaml", *TINY, f"data.path={tmp_path / 'ds'}",
                          "--run-dir", str(tmp_path / "run"))
    assert_refused(outcome, str(tmp_path / "ds.idx"), "lies past the end of ds.bin")
    assert not (tmp_path / "run").exists()
