"""Parameter counts of `mtp build` against closed-form counts computed here by hand."""

from __future__ import annotations

import json

import pytest

from mtp_cli import build_model, load_spec
from mtp_cli.facts.counts import count_parameters
from tests.cli_helpers import run_mtp


def closed_form(*, vocab: int, hidden: int, layers: int, heads: int, groups: int, ffn: int,
                seq: int, depths: int, norm: str, activation: str, bias: bool, tied: bool,
                position: str = "learned_absolute") -> dict[str, object]:
    """Megatron's GPT + MTP parameter count, from the architecture alone."""
    head_dim = hidden // heads
    norm_params = 2 * hidden if norm == "LayerNorm" else hidden
    qkv_rows = (heads + 2 * groups) * head_dim
    fc1_rows = ffn * (2 if activation == "swiglu" else 1)
    layer = (
        norm_params
        + hidden * qkv_rows + (qkv_rows if bias else 0)
        + heads * head_dim * hidden + (hidden if bias else 0)
        + norm_params
        + hidden * fc1_rows + (fc1_rows if bias else 0)
        + ffn * hidden + (hidden if bias else 0)
    )
    embedding = vocab * hidden + (seq * hidden if position == "learned_absolute" else 0)
    decoder = layers * layer + norm_params
    mtp_layer = 2 * norm_params + 2 * hidden * hidden + layer + norm_params
    output = vocab * hidden
    total = embedding + decoder + depths * mtp_layer + output
    return {"total": total, "unique": total - (output if tied else 0), "embedding": embedding,
            "decoder": decoder, "mtp": [mtp_layer] * depths, "output_layer": output}


def test_check_figure_of_one_mtp_layer():
    """hidden 64, 8 heads, ffn 256, LayerNorm, biases, gelu: 49,984 + 8,192 + 384 = 58,560."""
    counts = closed_form(vocab=64, hidden=64, layers=1, heads=8, groups=8, ffn=256, seq=8,
                         depths=1, norm="LayerNorm", activation="gelu", bias=True, tied=False)
    assert counts["mtp"] == [58_560]
    spec = load_spec({"model": {"vocab_size": 64, "hidden_size": 64, "num_layers": 1,
                                "num_attention_heads": 8, "ffn_hidden_size": 256,
                                "seq_length": 8}})
    model = build_model(spec, "meta")
    assert count_parameters(model).mtp == [58_560]
    layer = model.mtp.layers["0"]
    assert sum(p.numel() for p in layer.transformer_layer.parameters()) == 49_984
    assert layer.eh_proj.weight.numel() == 8_192


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("depths", [0, 1, 3])
@pytest.mark.parametrize("norm,activation", [("LayerNorm", "gelu"), ("RMSNorm", "swiglu")])
def test_counts_equal_closed_form(tied, depths, norm, activation):
    spec = load_spec({
        "model": {"vocab_size": 96, "hidden_size": 48, "num_layers": 3, "num_attention_heads": 6,
                  "num_query_groups": 2, "ffn_hidden_size": 80, "seq_length": 16,
                  "normalization": norm, "activation": activation,
                  "share_embeddings_and_output_weights": tied,
                  "add_bias_linear": norm == "LayerNorm"},
        "mtp": {"num_layers": depths},
    })
    expected = closed_form(vocab=96, hidden=48, layers=3, heads=6, groups=2, ffn=80, seq=16,
                           depths=depths, norm=norm, activation=activation,
                           bias=norm == "LayerNorm", tied=tied)
    counts = count_parameters(build_model(spec, "meta")).as_dict()
    for key, value in expected.items():
        assert counts[key] == value, key
    real = build_model(spec, "cpu")
    assert sum(p.numel() for p in real.parameters()) == expected["unique"]
    keys = real.state_dict().keys()
    assert ("output_layer.weight" in keys) == (not tied)


def test_repeated_layer_counts_once_in_unique():
    spec = load_spec({"model": {"vocab_size": 64, "hidden_size": 32, "num_layers": 2,
                                "num_attention_heads": 4, "seq_length": 8},
                      "mtp": {"num_layers": 3, "use_repeated_layer": True}})
    counts = count_parameters(build_model(spec, "meta"))
    assert counts.mtp[0] == counts.mtp[1] == counts.mtp[2]
    assert counts.total - counts.unique == 2 * counts.mtp[0]


def test_build_json_reports_parameter_counts():
    result = run_mtp("build", "specs/tiny.yaml", "mtp.num_layers=3", "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    expected = closed_form(vocab=320, hidden=64, layers=4, heads=4, groups=2, ffn=192, seq=64,
                           depths=3, norm="RMSNorm", activation="swiglu", bias=False,
                           tied=False, position="rope")
    for key, value in expected.items():
        assert payload["parameters"][key] == value, key
