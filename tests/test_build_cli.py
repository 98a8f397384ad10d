"""`mtp build` and `mtp schema`: what a user sees and scripts against."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from mtp_cli import build_model, load_spec
from tests.cli_helpers import run_mtp


@pytest.mark.slow  # a new interpreter
def test_help_lists_the_commands():
    result = run_mtp("--help", real_process=True)  # once, as a user would
    assert result.returncode == 0
    for command in ("build", "schema"):
        assert command in result.stdout


def test_show_spec_round_trips_unchanged(tmp_path: Path):
    first = run_mtp("build", "specs/tiny.yaml", "--show-spec")
    assert first.returncode == 0, first.stderr
    modules = yaml.safe_load(first.stdout)
    assert modules["modules"]["decoder_layer"]["module"] == "TransformerLayer"
    mtp_layer = modules["modules"]["mtp_layer"]
    assert mtp_layer["module"] == "MultiTokenPredictionLayer"
    assert mtp_layer["submodules"]["transformer_layer"] == modules["modules"]["decoder_layer"]
    spec = yaml.safe_load(Path("specs/tiny.yaml").read_text())
    spec.update(modules)
    fed_back = tmp_path / "with_modules.yaml"
    fed_back.write_text(yaml.safe_dump(spec, sort_keys=False))
    second = run_mtp("build", str(fed_back), "--show-spec")
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout


def test_modules_section_swaps_an_implementation():
    """Naming LayerNorm where the backend slot would pick RMSNorm changes only that norm."""
    base = {"model": {"vocab_size": 64, "hidden_size": 32, "num_layers": 2,
                      "num_attention_heads": 4, "seq_length": 8, "normalization": "RMSNorm"}}
    tree = yaml.safe_load(run_mtp("build", "specs/tiny.yaml", "--show-spec").stdout)
    decoder = tree["modules"]["decoder_layer"]
    decoder["submodules"]["input_layernorm"] = {"module": "LayerNorm"}
    model = build_model(load_spec({**base, "modules": {"decoder_layer": decoder}}))
    layer = model.decoder.layers["0"]
    assert isinstance(layer.input_layernorm, torch.nn.LayerNorm)
    assert isinstance(layer.pre_mlp_layernorm, torch.nn.RMSNorm)
    # the MTP layer's transformer layer follows the decoder layer spec (Megatron's rule)
    assert isinstance(model.mtp.layers["0"].transformer_layer.input_layernorm, torch.nn.LayerNorm)


def test_materialize_runs_forward_and_backward():
    result = run_mtp("build", "specs/tiny.yaml", "--materialize", "--json")
    assert result.returncode == 0, result.stderr
    check = json.loads(result.stdout)["materialize"]
    assert check["gradients_finite"] is True
    assert len(check["mtp_losses"]) == 2
    # untrained model on 320 ids: every loss is close to ln(320) = 5.77
    for loss in [check["lm_loss"], *check["mtp_losses"]]:
        assert 5.0 < loss < 6.5


def test_materialize_beyond_memory_exits_2_before_allocating():
    """`hidden_size=2**24` is within the spec's size limits (a meta build works), but each
    attention projection alone holds 2^48 parameters (a petabyte in fp32): refused from the meta
    build's count, before one byte is allocated."""
    from tests.inspect_fixtures import invoke

    result = invoke("build", "specs/tiny.yaml", "model.hidden_size=16777216",
                    "model.ffn_hidden_size=64", "--materialize")
    assert result.exit_code == 2, result.output
    assert "--materialize needs at least" in result.output and "GiB available" in result.output
    assert "Traceback" not in result.output


def test_materialize_fits_against_a_stated_memory():
    from mtp_cli.errors import UserError
    from mtp_cli.facts.describe import check_materialize_fits

    spec = load_spec("specs/tiny.yaml")
    check_materialize_fits(spec, 1000, available=8000)  # exactly 8 bytes a parameter: fits
    try:
        check_materialize_fits(spec, 1001, available=8000)
    except UserError as error:
        assert "1,001 parameters" in str(error)
    else:
        raise AssertionError("1001 parameters x 8 bytes do not fit in 8000 bytes")


def test_schema_is_json_schema_of_the_spec():
    result = run_mtp("schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert schema["required"] == ["model"]
    model = schema["$defs"]["ModelConfig"]
    assert model["additionalProperties"] is False
    assert "hidden_size" in model["required"]
