"""Spec errors read as statements about the YAML a person wrote: the override or the file line at
fault, the key path, what was expected in YAML's words, and never an internal type name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mtp_cli.config.loader import edit_distance, load_spec
from mtp_cli.config.schema import RunSpec
from mtp_cli.errors import SpecError
from tests.cli_helpers import SPECS, run_mtp

TINY = SPECS / "tiny.yaml"
MODEL = """model:
  vocab_size: 64
  hidden_size: 32
  num_layers: 2
  num_attention_heads: 4
  seq_length: 8
"""
# Names people never wrote: the schema's classes, Pydantic's union tags, Python spellings.
INTERNAL = [*RunSpec.model_json_schema()["$defs"], "RunSpec", "constrained-", "instance of",
            "NoneType", "(got None)", "(got True)", "(got False)", "got int", "got str",
            "got list", "got dict", "float_type", "list["]


def problems(source, overrides=()) -> list[str]:
    with pytest.raises(SpecError) as caught:
        load_spec(source, overrides)
    return [p.render() for p in caught.value.problems]


def assert_plain(lines: list[str]) -> None:
    for line in lines:
        for name in INTERNAL:
            assert name not in line, (name, line)


def test_typo_in_the_first_part_of_an_override_is_the_overrides_fault():
    lines = problems(TINY, ["modle.hidden_size=128"])
    assert lines == ["override 'modle.hidden_size=128': modle: unknown key "
                     "(did you mean 'model'?)"]


@pytest.mark.parametrize(("override", "suggestion"), [
    ("trian.lr=3", "train"), ("mtp.num_layrs=3", "num_layers"),
    ("model.hiddensize=3", "hidden_size"), ("train.loss.chnked=true", "chunked"),
    ("paralel.tensor=2", "parallel"), ("chekpoint.interval=5", "checkpoint"),
])
def test_override_typos_suggest_the_nearest_key(override, suggestion):
    (line,) = problems(TINY, [override])
    assert line.startswith(f"override '{override}': ")
    assert f"(did you mean '{suggestion}'?)" in line


def test_edit_distance_counts_a_swap_as_one_edit():
    assert edit_distance("modle", "model") == 1
    assert edit_distance("modle", "modules") == 2
    assert edit_distance("", "abc") == 3 and edit_distance("same", "same") == 0


def test_spec_file_typos_still_point_at_the_line(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(MODEL + "modle:\n  hidden_size: 3\n")
    assert problems(spec) == [f"{spec}:7:1: modle: unknown key (did you mean 'model'?)"]


@pytest.mark.parametrize(("text", "where", "message"), [
    ("  init_method_std: .nan\n", ":7:20: model.init_method_std:", "non-finite number '.nan'"),
    ("  layernorm_epsilon: -.inf\n", ":7:22: model.layernorm_epsilon:", "non-finite number"),
    ("  rotary_base: 1e999\n", ":7:16: model.rotary_base:", "non-finite number '1e999'"),
    ("mtp:\n  loss_scaling_factor: [{until_tokens: .inf, value: 1}, {value: 2}]\n",
     ":8:40: mtp.loss_scaling_factor[0].until_tokens:", "non-finite number"),
    ("  seq_length: 16\n", ":7:3: model.seq_length:", "duplicate key 'seq_length'"),
    ("  ffn_hidden_size: !!int many\n", ":7:20: model.ffn_hidden_size:", "'many' is not a valid int"),
    ("data:\n  path: !!timestamp 2001-12-14\n", ":8:9: data.path:", "tag '!!timestamp'"),
])
def test_errors_found_while_reading_yaml_name_the_key_path(tmp_path, text, where, message):
    spec = tmp_path / "spec.yaml"
    spec.write_text(MODEL + text)
    (line,) = problems(spec)
    assert line.startswith(f"{spec}{where} "), line
    assert message in line


def test_non_finite_override_names_its_key():
    assert problems(TINY, ["train.lr=.nan"]) == [
        "override 'train.lr=.nan': train.lr: non-finite number '.nan' is not allowed"]


@pytest.mark.parametrize(("override", "expected"), [
    ("model=3", "model: expected a mapping (key: value lines) (got 3)"),
    ("mtp=[1]", "mtp: expected a mapping (key: value lines) (got a list)"),
    ("train.loss=3", "train.loss: expected a mapping (key: value lines) (got 3)"),
    ("model.hidden_size=abc", "model.hidden_size: expected an integer (got 'abc')"),
    ("model.hidden_size=1.5", "model.hidden_size: expected an integer (got 1.5)"),
    ("model.hidden_size=", "model.hidden_size: expected an integer (got null)"),
    ("train.lr=true", "train.lr: expected a number (got true)"),
    ("logging.tensorboard=1", "logging.tensorboard: expected a boolean (true or false) (got 1)"),
    ("parallel.layout=[1]", "parallel.layout: expected a string (got a list)"),
    ("model.activation=relu", "model.activation: expected one of 'gelu' or 'swiglu' (got 'relu')"),
    ("train.loss.chunked=maybe",
     "train.loss.chunked: expected one of 'auto', true or false (got 'maybe')"),
    ("model.rotary_base=-1", "model.rotary_base: must be greater than 0 (got -1)"),
    ("mtp.loss_scaling_factor=abc",
     "mtp.loss_scaling_factor: expected a number or a list of steps (got 'abc')"),
    ("mtp.loss_scaling_factor={a: 1}",
     "mtp.loss_scaling_factor: expected a number or a list of steps (got a mapping)"),
    ("mtp.loss_scaling_factor=-1",
     "mtp.loss_scaling_factor: must be greater than or equal to 0 (got -1)"),
    ("mtp.loss_scaling_factor=[{value: x}]",
     "mtp.loss_scaling_factor[0].value: expected a number (got 'x')"),
    ("mtp.loss_scaling_factor=[3]",
     "mtp.loss_scaling_factor[0]: expected a mapping (key: value lines) (got 3)"),
    ("modules.decoder_layer={module: TransformerLayer, submodules: {mlp: [1]}}",
     "modules.decoder_layer.submodules.mlp: expected a module name or a mapping, got a list"),
])
def test_messages_use_yaml_words_not_type_names(override, expected):
    lines = problems(TINY, [override])
    assert lines == [f"override '{override}': {expected}"]
    assert_plain(lines)


def test_every_message_of_a_broken_spec_is_plain(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "model: {vocab_size: x, hidden_size: [1], num_layers: true, num_attention_heads: null,"
        " seq_length: 1.5, normalization: 3, backend: {a: 1}}\n"
        "mtp: {num_layers: -1, loss_scaling_factor: [{value: [1]}, 7], detach_heads: 0}\n"
        "train: {loss: [], steps: '5'}\ndata: 3\nparallel: {tensor: 1e3}\n")
    lines = problems(spec)
    assert len(lines) >= 10
    assert_plain(lines)
    assert all(re.match(rf"{re.escape(str(spec))}:\d+:\d+: \w", line) for line in lines), lines


@pytest.mark.slow
def test_cli_reports_the_override_typo(tmp_path):
    result = run_mtp("build", "specs/tiny.yaml", "modle.hidden_size=128")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "override 'modle.hidden_size=128': modle: unknown key (did you mean 'model'?)" in \
        " ".join(result.stderr.split())
    assert "tiny.yaml" not in result.stderr


def test_a_spec_that_is_not_a_regular_file(tmp_path: Path):
    import os

    fifo = tmp_path / "spec.yaml"
    os.mkfifo(fifo)
    (line,) = problems(fifo)
    assert line == f"{fifo}: cannot read: not a regular file (a FIFO, device or socket)"
