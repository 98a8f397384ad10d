"""`mtp data prepare`: JSONL, text and tables into Megatron's .bin/.idx, in order, streaming.

The reference for every prepared file is the in-process pipeline that training runs on the same
corpus (`load_token_stream` on the raw files, `HFTokenizer.encode` per document); the files are
read back with the project's `.idx` reader, and (slow tier) with Megatron-Core's own
`IndexedDataset` when it can be imported. Two-worker runs fork processes, so they are slow.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mtp_cli.cli import app
from mtp_cli.data import prepare as prepare_module
from mtp_cli.data.datasets import load_token_stream
from mtp_cli.data.indexed import read_indexed_dataset
from mtp_cli.data.indexed_writer import IndexedDatasetWriter, optimal_dtype
from mtp_cli.data.prepare import prepare
from mtp_cli.data.tokenizer import ByteTokenizer, HFTokenizer
from mtp_cli.errors import UserError

TEXTS = ["héllo wörld, again and again", "", "second document\nwith two lines",
         "日本語のテキスト", "tabs\tand  spaces  ", "the end"]


def bpe_tokenizer(path: Path) -> Path:
    """A byte-level BPE (about 300 ids, `<|endoftext|>` included) trained on TEXTS."""
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TEXTS * 20, trainer)
    tokenizer.save(str(path))
    return path


def write_jsonl(path: Path, texts: list[str], key: str = "text") -> Path:
    path.write_text("".join(json.dumps({key: t, "id": i}) + "\n" for i, t in enumerate(texts)),
                    encoding="utf-8")
    return path


def documents(prefix: Path) -> list[list[int]]:
    tokens, lengths = read_indexed_dataset(prefix)
    return [d.tolist() for d in tokens.split(lengths.tolist())]


def test_jsonl_with_a_bpe_tokenizer_matches_encoding_each_document(tmp_path):
    tokenizer = bpe_tokenizer(tmp_path / "tok.json")
    corpus = write_jsonl(tmp_path / "c.jsonl", TEXTS)
    summary = prepare([corpus], str(tokenizer), tmp_path / "out", append_eod=True)
    reference = HFTokenizer(tokenizer)
    expected = [[*reference.encode(t).tolist(), reference.eod] if t else [] for t in TEXTS]
    assert documents(tmp_path / "out") == expected
    assert (summary.documents, summary.tokens) == (len(TEXTS), sum(map(len, expected)))
    assert summary.input_bytes == corpus.stat().st_size and summary.dtype == "uint16"
    assert load_token_stream(str(corpus), reference).tokens.tolist() == \
        load_token_stream(str(tmp_path / "out"), reference).tokens.tolist()


def test_text_file_and_directory_give_the_in_process_token_stream(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "b.txt").write_bytes("zweite Datei äöü".encode())
    (corpus / "a.txt").write_bytes(b"first file\n")
    (corpus / "sub" / "c.md").write_bytes(b"# third\x80 (not UTF-8: bytes are fine)")
    (corpus / ".hidden").write_bytes(b"never read")
    (corpus / "blob.bin").write_bytes(b"\x00\x01binary")
    write_jsonl(corpus / "d.jsonl", ["from jsonl", "two"])
    warnings: list[str] = []
    byte_tokenizer = ByteTokenizer()
    for source, prefix in ((corpus, tmp_path / "dir"), (corpus / "a.txt", tmp_path / "file")):
        prepare([source], "bytes", prefix, warn=warnings.append)
        assert load_token_stream(str(prefix), byte_tokenizer).tokens.tolist() == \
            load_token_stream(str(source), byte_tokenizer).tokens.tolist()
    assert documents(tmp_path / "file") == [list(b"first file\n")]
    assert [bytes(d) for d in documents(tmp_path / "dir")] == [
        b"first file\n", "zweite Datei äöü".encode(), b"from jsonl", b"two",
        b"# third\x80 (not UTF-8: bytes are fine)"]
    assert any("blob.bin" in w for w in warnings)


def test_many_chunks_keep_input_order_and_the_eod_is_appended(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module, "CHUNK_RECORDS", 3)
    texts = [f"document number {i} " * (i % 7) for i in range(50)]
    prepare([write_jsonl(tmp_path / "c.jsonl", texts)], "bytes", tmp_path / "out",
            append_eod=True)
    assert documents(tmp_path / "out") == [[*t.encode(), 256] if t else [] for t in texts]


def test_bad_record_fails_naming_file_and_line_and_leaves_no_output(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "fine"}\n\n{"body": "no text"}\n{"text": 3}\nnot json\n')
    with pytest.raises(UserError) as error:
        prepare([corpus], "bytes", tmp_path / "out")
    assert error.value.render().startswith(f"{corpus}:3: expected a JSON object with a 'text'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]


def test_bad_records_are_skipped_and_named_when_asked(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "fine"}\n\n{"body": "no text"}\n{"text": 3}\nnot json\n'
                      '{"text": "also fine"}\n')
    summary = prepare([corpus], "bytes", tmp_path / "out", on_bad_record="skip")
    assert documents(tmp_path / "out") == [list(b"fine"), list(b"also fine")]
    assert summary.skipped == 3
    assert [s.split(": ", 1)[0] for s in summary.skipped_records] == \
        [f"{corpus}:3", f"{corpus}:4", f"{corpus}:5"]
    assert "'text' must be a string, got a number" in summary.skipped_records[1]


def test_cli_exits_2_naming_the_bad_line(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "ok"}\n{"text": null}\n')
    result = CliRunner().invoke(app, ["data", "prepare", str(corpus), "--tokenizer", "bytes",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert f"{corpus}:2: 'text' must be a string, got null" in result.output
    assert not (tmp_path / "out.idx").exists()
    result = CliRunner().invoke(app, ["data", "prepare", str(corpus), "--tokenizer", "bytes",
                                      "--out", str(tmp_path / "out"), "--on-bad-record", "skip",
                                      "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert (summary["documents"], summary["skipped"]) == (1, 1)


def test_an_interrupted_prepare_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module, "CHUNK_RECORDS", 2)
    original, calls = prepare_module.encode_chunk, []

    def failing(records):
        calls.append(len(records))
        if len(calls) == 3:
            raise RuntimeError("injected fault")  # a worker dying mid-way
        return original(records)

    monkeypatch.setattr(prepare_module, "encode_chunk", failing)
    corpus = write_jsonl(tmp_path / "c.jsonl", [f"doc {i}" for i in range(10)])
    (tmp_path / "out.idx").write_bytes(b"an old index")
    with pytest.raises(RuntimeError, match="injected fault"):
        prepare([corpus], "bytes", tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "out.idx"]
    assert (tmp_path / "out.idx").read_bytes() == b"an old index"  # untouched until the end


def test_existing_output_is_refused_without_overwrite(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", ["a"])
    prepare([corpus], "bytes", tmp_path / "out")
    with pytest.raises(UserError, match=r"out.bin: exists \(pass --overwrite"):
        prepare([corpus], "bytes", tmp_path / "out")
    with pytest.raises(UserError, match="--tokenizer: does not exist"):
        prepare([corpus], str(tmp_path / "nope.json"), tmp_path / "other")


def test_the_index_is_megatrons_layout_byte_for_byte(tmp_path):
    writer = IndexedDatasetWriter(tmp_path / "x", torch.int32)
    for doc in ([5, 6, 7], [], [70000]):
        writer.add_document(doc)
    writer.finalize()
    expected = (b"MMIDIDX\x00\x00" + struct.pack("<QB", 1, 4) + struct.pack("<QQ", 3, 4)
                + struct.pack("<3i", 3, 0, 1) + struct.pack("<3q", 0, 12, 12)
                + struct.pack("<4q", 0, 1, 2, 3))
    assert (tmp_path / "x.idx").read_bytes() == expected
    assert (tmp_path / "x.bin").read_bytes() == struct.pack("<4i", 5, 6, 7, 70000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin", "x.idx"]
    assert (optimal_dtype(257), optimal_dtype(65499), optimal_dtype(65500)) == \
        (torch.uint16, torch.uint16, torch.int32)


def test_large_vocabularies_are_written_as_int32(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"w{i}": i for i in range(70000)} | {"[UNK]": 70000}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tok.json"))
    corpus = write_jsonl(tmp_path / "c.jsonl", ["w1 w69999 w65535", "w0 nothing"])
    summary = prepare([corpus], str(tmp_path / "tok.json"), tmp_path / "out", append_eod=True)
    assert summary.dtype == "int32" and summary.eod == 70001
    assert documents(tmp_path / "out") == [[1, 69999, 65535, 70001], [0, 70000, 70001]]


def _parquet(tmp_path: Path, texts: list[object], column: str = "content") -> Path:
    pa = pytest.importorskip("pyarrow", reason="parquet needs pyarrow (the data/test extra)")
    import pyarrow.parquet as pq

    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": list(range(len(texts))), column: texts}), path,
                   row_group_size=2)
    return path


def test_parquet_rows_match_encoding_each_text_and_bad_rows_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr("mtp_cli.data.prepare_sources.BATCH_ROWS", 2)
    tokenizer = bpe_tokenizer(tmp_path / "tok.json")
    path = _parquet(tmp_path, TEXTS)
    summary = prepare([path], str(tokenizer), tmp_path / "out", json_key="content")
    reference = HFTokenizer(tokenizer)
    assert documents(tmp_path / "out") == [reference.encode(t).tolist() for t in TEXTS]
    assert summary.input_bytes == path.stat().st_size
    with pytest.raises(UserError, match="no column 'text'"):
        prepare([path], "bytes", tmp_path / "other")
    bad = _parquet(tmp_path, ["ok", None, "fine"])
    with pytest.raises(UserError, match=rf"{bad}: row 2: 'content' must be a string, got null"):
        prepare([bad], "bytes", tmp_path / "other", json_key="content")


def test_a_saved_dataset_directory_is_read_in_its_file_order(tmp_path):
    """The layout `datasets.Dataset.save_to_disk` writes: state.json names Arrow stream files."""
    pa = pytest.importorskip("pyarrow", reason="arrow needs pyarrow (the data/test extra)")
    import pyarrow.ipc

    saved = tmp_path / "saved"
    saved.mkdir()
    shards = {"data-00001-of-00002.arrow": ["third", "fourth"],
              "data-00000-of-00002.arrow": ["first", "second"]}
    for name, texts in shards.items():
        table = pa.table({"text": texts})
        with pyarrow.ipc.new_stream(str(saved / name), table.schema) as stream:
            stream.write_table(table)
    order = ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    (saved / "state.json").write_text(json.dumps({"_data_files": [{"filename": n}
                                                                  for n in order]}))
    prepare([saved], "bytes", tmp_path / "out")
    assert [bytes(d) for d in documents(tmp_path / "out")] == [b"first", b"second", b"third",
                                                                b"fourth"]


def test_datasets_save_to_disk_directory_when_installed(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the `datasets` package is not installed")
    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(tmp_path / "saved"))
    prepare([tmp_path / "saved"], "bytes", tmp_path / "out")
    assert [bytes(d) for d in documents(tmp_path / "out")] == [t.encode() for t in TEXTS]


# ---- slow: worker processes, Megatron-Core's reader, killed runs ------------------------------

@pytest.mark.slow
def test_two_workers_write_the_same_files_as_one(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module, "CHUNK_RECORDS", 5)
    tokenizer = bpe_tokenizer(tmp_path / "tok.json")
    texts = [TEXTS[i % len(TEXTS)] * (i % 5) for i in range(200)]
    inputs: list[Path] = [write_jsonl(tmp_path / "c.jsonl", texts)]
    if importlib.util.find_spec("pyarrow") is not None:
        inputs.append(_parquet(tmp_path, [f"row {i}" for i in range(30)], column="text"))
    (tmp_path / "dir").mkdir()
    for i in range(12):
        (tmp_path / "dir" / f"{i:02d}.txt").write_text(TEXTS[i % len(TEXTS)] + f" {i}")
    inputs.append(tmp_path / "dir")
    for name in ("one", "two"):
        prepare(inputs, str(tokenizer), tmp_path / name, workers=1 if name == "one" else 2,
                append_eod=True, json_key="text")
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"one{suffix}").read_bytes() == (tmp_path / f"two{suffix}").read_bytes()


def megatron_indexed_dataset() -> types.ModuleType:
    """megatron.core.datasets.indexed_dataset (0.19.2), from an installed megatron-core or from
    $MEGATRON_CORE_PATH (`pip install --no-deps --target DIR megatron-core==0.19.2`). Only that
    module is loaded: megatron.core's package import needs triton and more."""
    root = os.environ.get("MEGATRON_CORE_PATH")
    spec = importlib.util.find_spec("megatron")
    base = Path(root) / "megatron" if root else (
        Path(next(iter(spec.submodule_search_locations))) if spec else None)
    if base is None or not (base / "core" / "datasets" / "indexed_dataset.py").is_file():
        pytest.skip("megatron-core is not importable (set MEGATRON_CORE_PATH)")
    pytest.importorskip("numpy")
    saved = {k: v for k, v in sys.modules.items() if k == "megatron" or k.startswith("megatron.")}
    for name, path in (("megatron", base), ("megatron.core", base / "core"),
                       ("megatron.core.datasets", base / "core" / "datasets")):
        package = types.ModuleType(name)
        package.__path__ = [str(path)]
        sys.modules[name] = package
    utils = types.ModuleType("megatron.core.utils")
    utils.log_single_rank = lambda logger, level, *args, **kw: logger.log(level, *args, **kw)
    sys.modules["megatron.core.utils"] = utils
    try:
        return importlib.import_module("megatron.core.datasets.indexed_dataset")
    finally:
        for name in [k for k in sys.modules if k == "megatron" or k.startswith("megatron.")]:
            del sys.modules[name]
        sys.modules.update(saved)


@pytest.mark.slow
def test_megatron_cores_indexed_dataset_reads_what_prepare_wrote(tmp_path):
    indexed = megatron_indexed_dataset()
    texts = ["alpha beta", "", "gamma δ"]
    prepare([write_jsonl(tmp_path / "c.jsonl", texts)], "bytes", tmp_path / "out",
            append_eod=True)
    dataset = indexed.IndexedDataset(str(tmp_path / "out"), mmap=True)
    assert len(dataset) == 3 and dataset.index.dtype.__name__ == "uint16"
    assert [dataset[i].tolist() for i in range(3)] == [[*t.encode(), 256] if t else []
                                                       for t in texts]
    assert dataset.document_indices.tolist() == [0, 1, 2, 3]
    # and Megatron's own builder writes byte-identical files from the same documents
    builder = indexed.IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=dataset.index.dtype)
    for i in range(3):
        builder.add_document(dataset[i], [len(dataset[i])])
    builder.finalize(str(tmp_path / "ref.idx"))
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"ref{suffix}").read_bytes() == (tmp_path / f"out{suffix}").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT])
def test_a_killed_prepare_command_leaves_no_dataset(tmp_path, how):
    corpus = tmp_path / "c.jsonl"
    with open(corpus, "w") as handle:
        line = json.dumps({"text": "a line of text " * 40}) + "\n"
        handle.writelines(line for _ in range(400_000))  # ~250 MB: longer than the wait below
    process = subprocess.Popen(
        [sys.executable, "-m", "mtp_cli", "data", "prepare", str(corpus), "--tokenizer", "bytes",
         "--out", str(tmp_path / "out"), "--workers", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        # a Ctrl-C reaches the command even when this test runs where SIGINT is ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("out.bin.tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    process.send_signal(how)
    process.wait(timeout=60)
    assert process.returncode != 0
    names = {p.name for p in tmp_path.iterdir()}
    assert "out.bin" not in names and "out.idx" not in names
    if how == signal.SIGINT:  # a Ctrl-C cleans up after itself
        assert names == {"c.jsonl"}
