"""Corpora and tokenizers: the default standard-library corpus, text/dir/JSONL readers, errors."""

from __future__ import annotations

import json
import os
import sysconfig
import time
from pathlib import Path

import pytest
import torch

from mtp_cli.data import ByteTokenizer, build_datasets, load_tokenizer
from mtp_cli.data.corpus import STDLIB_EXCLUDED_DIRS, stdlib_files
from mtp_cli.data.datasets import validation_documents
from mtp_cli.errors import UserError
from tests.data_helpers import EOD, byte_stream, make_spec, write_text_files


def stream_of(spec) -> list[int]:
    train, _ = build_datasets(spec)
    return train.stream.tokens.tolist()


def test_byte_tokenizer_round_trips_any_bytes_and_text():
    tokenizer = ByteTokenizer()
    raw = bytes(range(256)) + "héllo ✓".encode()
    ids = tokenizer.encode(raw)
    assert ids.dtype == torch.int64 and ids.tolist() == list(raw)
    assert tokenizer.decode(ids) == raw
    assert tokenizer.encode("é").tolist() == [0xC3, 0xA9]
    assert tokenizer.decode([104, EOD, 105]) == b"hi"  # EOD is not a byte
    assert (tokenizer.eod, tokenizer.vocab_size) == (256, 257)


def test_default_corpus_is_the_sorted_stdlib_sources_without_third_party_code():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files()
    names = [p.relative_to(root).as_posix() for p in files]
    assert names == sorted(names) and len(names) > 100
    assert "os.py" in names and "json/__init__.py" in names
    for name in names:
        parts = name.split("/")
        assert not set(parts) & STDLIB_EXCLUDED_DIRS, name
        assert name.endswith(".py") and not parts[-1].startswith("_sysconfigdata")
    # An independent walk with the same rules finds exactly these files (site-packages, often
    # large, is skipped at the top so that the walk stays fast).
    candidates = [p for top in root.iterdir() if top.name != "site-packages"
                  for p in ([top] if top.is_file() else top.rglob("*.py"))]
    expected = sorted(
        p.relative_to(root).as_posix() for p in candidates
        if p.suffix == ".py" and not set(p.relative_to(root).parts[:-1]) & STDLIB_EXCLUDED_DIRS
        and not any(part.startswith(("config-", ".")) for part in p.relative_to(root).parts)
        and not p.name.startswith("_sysconfigdata")
    )
    assert names == expected


def test_default_corpus_tokens_are_file_bytes_then_eod_and_load_fast():
    spec = make_spec(seq_length=64, val_fraction=0.05)
    start = time.process_time()  # CPU time: the other processes on the cores do not count
    train, val = build_datasets(spec)
    elapsed = time.process_time() - start
    assert elapsed < 20, f"default corpus took {elapsed:.1f} s of CPU"  # ~1 s
    files = stdlib_files()
    held_out = validation_documents(len(files), 0.05)
    first_val = int(torch.nonzero(held_out)[0])
    # train starts with files 0, 1 (not held out); val starts with the first held-out file.
    assert train.stream.tokens[:200].tolist() == byte_stream(
        files[0].read_bytes(), files[1].read_bytes())[:200]
    assert val.stream.tokens[:100].tolist() == byte_stream(files[first_val].read_bytes())[:100]
    assert len(val.stream) < len(train.stream) / 10 and len(val) > 0
    assert int(train.stream.tokens.max()) == EOD and int(train.stream.tokens.min()) >= 0
    again, _ = build_datasets(spec)  # cached: same streams, no second read
    assert again.stream is train.stream


def test_validation_documents_are_evenly_spread():
    mask = validation_documents(40, 0.05)
    assert torch.nonzero(mask).flatten().tolist() == [19, 39]
    assert not validation_documents(10, 0.0).any()


def test_text_file_is_one_document(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"hello world, hello bytes\n")
    assert stream_of(make_spec(path=str(path))) == byte_stream(path.read_bytes())


def test_directory_reads_files_in_sorted_order_recursively_skipping_hidden_and_binary(tmp_path):
    write_text_files(tmp_path, {
        "b.txt": b"second", "a/z.txt": b"first", "c/d/e.md": b"third", ".hidden": b"no",
        ".git/config": b"no", "blob.bin": b"\x00\x01binary", "empty.txt": b"",
        "f.jsonl": b'{"text": "fourth"}\n\n{"text": "fifth"}\n',
    })
    assert stream_of(make_spec(path=str(tmp_path))) == byte_stream(
        b"first", b"second", b"third", b"fourth", b"fifth")


def test_jsonl_reads_the_text_field_of_every_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [{"text": "héllo"}, {"text": "wörld", "id": 3}, {"text": ""}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    assert stream_of(make_spec(path=str(path), seq_length=4)) == byte_stream(
        "héllo".encode(), "wörld".encode())


@pytest.mark.parametrize("line, expected", [
    ('{"text": "ok"}\n{"text": broken}\n', "not a JSON line"),
    ('{"text": "ok"}\n["a list"]\n', "'text' field"),
    ('{"text": "ok"}\n{"text": 3}\n', "must be a string"),
])
def test_malformed_jsonl_line_names_file_and_line(tmp_path, line, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text(line)
    with pytest.raises(UserError) as info:
        build_datasets(make_spec(path=str(path)))
    assert f"{path}:2:" in str(info.value) and expected in str(info.value)


def test_missing_path_empty_corpus_and_short_corpus_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_datasets(make_spec(path=str(tmp_path / "nowhere.txt")))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_bytes(b"")
    with pytest.raises(UserError, match="empty corpus"):
        build_datasets(make_spec(path=str(tmp_path / "empty")))
    short = tmp_path / "short.txt"
    short.write_bytes(b"1234567")  # 7 bytes + EOD = 8 tokens < seq_length + 1 = 9
    with pytest.raises(UserError, match="shorter than one window"):
        build_datasets(make_spec(path=str(short), seq_length=8))
    short.write_bytes(b"12345678")  # exactly one window
    train, _ = build_datasets(make_spec(path=str(short), seq_length=8))
    assert len(train) == 1


def test_unreadable_file_is_a_user_error(tmp_path):
    write_text_files(tmp_path, {"a.txt": b"fine"})
    os.symlink(tmp_path / "gone.txt", tmp_path / "b.txt")  # dangling: cannot be read
    with pytest.raises(UserError, match=r"b\.txt: cannot read"):
        build_datasets(make_spec(path=str(tmp_path)))


def test_token_ids_must_fit_the_model_vocabulary(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"x" * 20)
    with pytest.raises(UserError, match="vocab"):
        build_datasets(make_spec(path=str(path), vocab_size=200))


def test_split_falls_back_to_tokens_for_a_single_document(tmp_path):
    path = tmp_path / "one.txt"
    path.write_bytes(bytes(range(65, 65 + 26)) * 4)  # 104 bytes + EOD = 105 tokens
    train, val = build_datasets(make_spec(path=str(path), val_fraction=0.1, seq_length=8))
    whole = byte_stream(path.read_bytes())
    assert len(val.stream) == 11  # ceil(0.1 * 105)
    assert train.stream.tokens.tolist() + val.stream.tokens.tolist() == whole
    with pytest.raises(UserError, match="val_fraction: 0"):
        build_datasets(make_spec(path=str(path), val_fraction=0.1, seq_length=60))


def test_split_by_document_keeps_documents_whole(tmp_path):
    docs = {f"{i:02d}.txt": bytes([65 + i]) * (10 + i) for i in range(20)}
    write_text_files(tmp_path, docs)
    train, val = build_datasets(make_spec(path=str(tmp_path), val_fraction=0.1))
    contents = list(docs.values())
    assert val.stream.tokens.tolist() == byte_stream(contents[9], contents[19])
    assert train.stream.tokens.tolist() == byte_stream(
        *[c for i, c in enumerate(contents) if i not in (9, 19)])


def _word_level_tokenizer(path: Path, special: str | None) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "again": 3}
    if special is not None:
        vocab[special] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    if special is not None:
        tokenizer.add_special_tokens([special])
    tokenizer.save(str(path))


def test_hf_tokenizer_uses_its_end_of_text_token_as_eod(tmp_path):
    pytest.importorskip("tokenizers")
    _word_level_tokenizer(tmp_path / "tok.json", "<|endoftext|>")
    write_text_files(tmp_path / "c", {"a.txt": b"hello world", "b.txt": b"again hello"})
    spec = make_spec(path=str(tmp_path / "c"), tokenizer=str(tmp_path / "tok.json"),
                     seq_length=4)
    assert stream_of(spec) == [1, 2, 4, 3, 1, 4]
    assert load_tokenizer(str(tmp_path / "tok.json"), 320).eod == 4


def test_hf_tokenizer_without_eos_gets_a_new_id_and_vocab_is_checked(tmp_path):
    pytest.importorskip("tokenizers")
    _word_level_tokenizer(tmp_path / "tok.json", None)
    tokenizer = load_tokenizer(str(tmp_path / "tok.json"), 320)
    assert (tokenizer.eod, tokenizer.vocab_size) == (4, 5)
    with pytest.raises(UserError, match="vocab_size"):
        load_tokenizer(str(tmp_path / "tok.json"), 4)
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing.json"), 320)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot load"):
        load_tokenizer(str(tmp_path / "bad.json"), 320)


def test_hf_tokenizer_rejects_non_utf8_text_naming_the_file(tmp_path):
    pytest.importorskip("tokenizers")
    _word_level_tokenizer(tmp_path / "tok.json", "</s>")
    write_text_files(tmp_path / "c", {"latin1.txt": "héllo".encode("latin-1")})
    spec = make_spec(path=str(tmp_path / "c"), tokenizer=str(tmp_path / "tok.json"))
    with pytest.raises(UserError, match=r"latin1\.txt: not UTF-8"):
        build_datasets(spec)


def test_missing_tokenizers_package_is_a_user_error(tmp_path, monkeypatch):
    (tmp_path / "tok.json").write_text("{}")
    monkeypatch.setitem(__import__("sys").modules, "tokenizers", None)  # import fails
    with pytest.raises(UserError, match="pip install tokenizers"):
        load_tokenizer(str(tmp_path / "tok.json"), 320)
