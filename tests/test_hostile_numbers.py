"""Issue 23, "every number bounded": integers past 10^18 (and Python's 4,300-digit limit) in the
JSON files mtp-cli reads, non-finite or overflowing floats in flags and config.json, sizes that
multiply out past memory. Each is refused with exit 2 and one line naming the file and key, or
the flag; no traceback, nothing outside `--out` changed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mtp_cli.checkpoint.files import CheckpointFileError, read_json_object
from mtp_cli.config.loader import load_spec
from tests.cli_helpers import SPECS, run_mtp
from tests.generate_helpers import save_run_dir, tiny_spec
from tests.hf_models import llama_config, saved_model
from tests.hostile_checks import listing, refused

HUGE = "9" * 4400  # past Python's 4,300-digit int() limit


def test_json_numbers_are_bounded_and_named_by_key(tmp_path):
    path = tmp_path / "x.json"
    cases = {
        '{"a": {"b": [1, ' + HUGE + ']}}': "a.b[1]",
        '{"step": 1000000000000000000000000000000}': "step",
        '{"rope_theta": 1e400}': "rope_theta",
        '{"loss": NaN}': "loss",
        '{"x": -Infinity}': "x",
    }
    for text, key in cases.items():
        path.write_text(text)
        with pytest.raises(CheckpointFileError) as caught:
            read_json_object(path)
        message = str(caught.value)
        assert message.startswith(f"{path}: {key}: ") and "\n" not in message, message
        assert len(message) < 300
    path.write_text('{"a": 1000000000000000000, "b": -2.5e300, "c": [0.1]}')
    assert read_json_object(path) == {"a": 10**18, "b": -2.5e300, "c": [0.1]}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from mtp_cli.builders.model_builder import build_model

    spec = tiny_spec(depths=1, vocab=320, hidden=32, seq_length=32)
    run = tmp_path_factory.mktemp("numbers") / "run"
    save_run_dir(build_model(spec).eval(), spec, run)
    return run


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run"


def test_a_4300_digit_integer_in_meta_json_is_refused_and_resume_falls_back(run_dir, tmp_path):
    """Weak row: a ValueError traceback, and train did not fall back to the older checkpoint."""
    from mtp_cli.checkpoint.run_dir import RunDir

    run = _copy(run_dir, tmp_path)
    older = run / "checkpoints" / "step_0000000"
    newer = run / "checkpoints" / "step_0000005"
    shutil.copytree(older, newer)
    meta = json.loads((newer / "meta.json").read_text())
    text = json.dumps({**meta, "step": 5, "tokens": 0}).replace('"tokens": 0',
                                                                 f'"tokens": {HUGE}')
    (newer / "meta.json").write_text(text)
    (run / "checkpoints" / "latest").write_text("step_0000005\n")
    resolution = RunDir(run).resolve()
    assert resolution.step == 0
    assert "tokens" in resolution.warnings[0] and "meta.json" in resolution.warnings[0]
    refused(run_mtp("inspect-ckpt", newer), "meta.json", "tokens")


def _hf(tmp_path: Path) -> Path:
    directory, _, _ = saved_model(tmp_path, llama_config(num_mtp_layers=0))
    return directory


def _edit_config(directory: Path, text_of) -> None:
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(text_of(config))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return _hf(tmp_path_factory.mktemp("hf"))


CONFIG_CASES = {
    "num_attention_heads": lambda c: json.dumps({**c, "num_attention_heads": 0}),
    "rope_theta": lambda c: json.dumps({**c, "rope_theta": 0}).replace(
        '"rope_theta": 0', '"rope_theta": 1' + "0" * 400),
    "rms_norm_eps": lambda c: json.dumps({**c, "rms_norm_eps": 0}).replace(
        '"rms_norm_eps": 0', '"rms_norm_eps": 1' + "0" * 400 + ".5"),
    "vocab_size": lambda c: json.dumps({**c, "vocab_size": 0}).replace(
        '"vocab_size": 0', f'"vocab_size": {HUGE}'),
    "model_type": lambda c: json.dumps({**c, "model_type": ["llama"]}),
    "architectures": lambda c: json.dumps({**c, "architectures": {"a": 1}}),
    "hidden_size": lambda c: json.dumps({**c, "hidden_size": 32.5}),
}


@pytest.mark.parametrize("key", list(CONFIG_CASES))
def test_config_json_numbers_and_types_are_refused_naming_the_key(hf_dir, tmp_path, key):
    """Weak row: ZeroDivisionError / OverflowError / TypeError / KeyError tracebacks."""
    hf = tmp_path / "hf"
    shutil.copytree(hf_dir, hf)
    _edit_config(hf, CONFIG_CASES[key])
    before = listing(tmp_path)
    text = refused(run_mtp("import", hf, "--out", tmp_path / "out"), "config.json", key)
    assert len(text.strip().splitlines()) == 1, text
    refused(run_mtp("generate", hf, "--prompt", "a"), "config.json", key)
    assert listing(tmp_path) == before


def test_a_4300_digit_integer_in_the_index_is_refused_naming_it(tmp_path):
    directory, _, _ = saved_model(tmp_path, llama_config(num_mtp_layers=0), shard="40KB")
    index = directory / "model.safetensors.index.json"
    payload = json.loads(index.read_text())
    payload["metadata"]["total_size"] = 0
    index.write_text(json.dumps(payload).replace('"total_size": 0', f'"total_size": {HUGE}'))
    refused(run_mtp("import", directory, "--out", tmp_path / "out"),
            "model.safetensors.index.json", "metadata.total_size")
    assert not (tmp_path / "out").exists()


def test_a_4300_digit_integer_in_an_eval_file_is_skipped_with_a_warning(tmp_path):
    from mtp_cli.report.evals import latest_eval

    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "step_0000001.json").write_text('{"step": 1, "lm_loss": 2.5}')
    (tmp_path / "eval" / "step_0000002.json").write_text('{"step": ' + HUGE + '}')
    warnings: list[str] = []
    assert latest_eval(tmp_path, warnings) == {"step": 1, "lm_loss": 2.5}
    assert "step_0000002.json" in warnings[0] and "step" in warnings[0]


@pytest.mark.parametrize("size", ["nanGB", "infGB", "1e400GB", "-infGB"])
def test_shard_size_must_be_finite(run_dir, tmp_path, size):
    refused(run_mtp("export", run_dir, "--out", tmp_path / "hf", "--shard-size", size),
            "--shard-size")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("size", ["nanGiB", "infGB", "1e400GiB"])
def test_device_memory_must_be_finite(size):
    refused(run_mtp("build", SPECS / "tiny.yaml", "--memory", "--device-memory", size),
            "--device-memory")


@pytest.mark.parametrize("flag,value", [("--temperature", "nan"), ("--temperature", "1e-320"),
                                        ("--temperature", "inf"),
                                        ("--seed", "99999999999999999999999"),
                                        ("--seed", "-1")])
def test_generate_flags_are_bounded(run_dir, flag, value):
    text = refused(run_mtp("generate", run_dir, "--prompt", "a", flag, value), flag)
    assert len(text.strip().splitlines()) == 1, text


def test_max_new_tokens_is_bounded_by_the_context(run_dir):
    """`--max-new-tokens 10^30` decodes up to the model's positions (32) and stops there;
    `1e30` is not an integer."""
    result = run_mtp("generate", run_dir, "--prompt", "ab", "--max-new-tokens", "1" + "0" * 30,
                     "--json", "--speculative", "off")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["completions"][0]["tokens"] <= 32 - 2
    refused(run_mtp("generate", run_dir, "--prompt", "a", "--max-new-tokens", "1e30"),
            "--max-new-tokens")


def test_decoding_past_free_memory_is_refused_before_allocating(tmp_path, monkeypatch):
    """Weak row: `max_position_embeddings: 2^40` accepted, then `--max-new-tokens 1e8` tried
    a 25.6 GB allocation up front. The caches are sized by what is asked, checked first."""
    import mtp_cli.generate.streams as streams
    from mtp_cli.hf.tokenizer_files import byte_tokenizer_json

    hf = _hf(tmp_path)
    (hf / "tokenizer.json").write_text(json.dumps(byte_tokenizer_json()))
    _edit_config(hf, lambda c: json.dumps({**c, "max_position_embeddings": 2**40}))
    monkeypatch.setattr(streams, "available_memory", lambda device: 2**32)
    text = refused(run_mtp("generate", hf, "--prompt", "a", "--max-new-tokens", "100000000"),
                   "--max-new-tokens", "KV cache")
    assert len(text.strip().splitlines()) == 1, text
    small = run_mtp("generate", hf, "--prompt", "a", "--max-new-tokens", "3", "--json")
    assert small.returncode == 0, small.stderr[-2000:]


def test_dry_run_world_size_is_bounded():
    refused(run_mtp("train", SPECS / "tiny.yaml", "train.global_batch_size=2000000000000",
                    "--dry-run-rank", "999999999999", "--world-size", "1000000000000",
                    real_process=False), "--world-size")


def test_load_spec_still_reads_a_bounded_meta_spec(run_dir):
    """The bound is on numbers, not on what a real checkpoint records."""
    meta = read_json_object(run_dir / "checkpoints" / "step_0000000" / "meta.json")
    assert load_spec(meta["spec"]).model.vocab_size == 320


def test_resume_truncation_skips_lines_with_unreadable_numbers(tmp_path):
    """metrics.jsonl read on resume: a 4,400-digit step or a string step is dropped, no
    ValueError from Python's int() limit."""
    from mtp_cli.checkpoint.run_dir import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": ' + HUGE + '}\n{"step": "2"}\n{"step": 3}\n')
    truncate_metrics(path, 2)
    assert path.read_text() == '{"step": 1}\n'


def test_a_stored_spec_larger_than_its_tensors_is_refused_before_allocating(run_dir, tmp_path):
    """meta.json's spec declaring a 2^30-token vocabulary over the run's 320-token tensors:
    generate and eval compare the shapes on the meta device first (building the model on the
    CPU first would allocate 137 GB)."""
    run = _copy(run_dir, tmp_path)
    meta_file = run / "checkpoints" / "step_0000000" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["spec"]["model"]["vocab_size"] = 2**30
    meta_file.write_text(json.dumps(meta))
    for args in (("generate", run, "--prompt", "a"), ("eval", run)):
        refused(run_mtp(*args), "step_0000000", "shapes differ",
                "embedding.word_embeddings.weight")
