"""Bad input: exit code 2, file:line and key path in the message, no traceback, no YAML code runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli_helpers import run_mtp

GOOD_MODEL = """model:
  vocab_size: 64
  hidden_size: 32
  num_layers: 2
  num_attention_heads: 4
  seq_length: 8
"""

# (name, spec text, extra CLI args, fragments the message must contain)
CASES: list[tuple[str, str | None, list[str], list[str]]] = [
    ("typo_key", GOOD_MODEL.replace("hidden_size: 32", "hidden_size: 32\n  hiden_size: 3"), [],
     [":4:3:", "model.hiden_size", "did you mean 'hidden_size'"]),
    ("wrong_type", GOOD_MODEL.replace("hidden_size: 32", "hidden_size: big"), [],
     [":3:3:", "model.hidden_size", "integer"]),
    ("zero_size", GOOD_MODEL.replace("num_layers: 2", "num_layers: 0"), [],
     [":4:3:", "model.num_layers", "greater than or equal to 1"]),
    ("negative_size", GOOD_MODEL.replace("vocab_size: 64", "vocab_size: -5"), [],
     [":2:3:", "model.vocab_size"]),
    ("heads_not_dividing_hidden", GOOD_MODEL.replace("num_attention_heads: 4",
                                                     "num_attention_heads: 5"), [],
     [":5:3:", "model.num_attention_heads", "must divide hidden_size"]),
    ("duplicate_key", GOOD_MODEL + "  seq_length: 16\n", [],
     [":7:3:", "duplicate key 'seq_length'", "line 6"]),
    ("nan", GOOD_MODEL + "  init_method_std: .nan\n", [], [":7:", "non-finite"]),
    ("inf", GOOD_MODEL + "  layernorm_epsilon: .inf\n", [], [":7:", "non-finite"]),
    ("non_integral", GOOD_MODEL.replace("num_layers: 2", "num_layers: 2.5"), [],
     [":4:3:", "model.num_layers", "integer"]),
    ("huge_float_for_int", GOOD_MODEL.replace("seq_length: 8", "seq_length: 1e30"), [],
     [":6:3:", "model.seq_length", "integer"]),
    ("top_level_list", "- model\n- mtp\n", [], [":1:1:", "top level is a list"]),
    ("python_tag", GOOD_MODEL + "mtp: !!python/object/apply:os.system ['touch MARKER']\n", [],
     [":7:", "python/object/apply"]),
    ("unknown_module", GOOD_MODEL + "modules:\n  decoder_layer:\n    module: TransformerLayr\n",
     [], [":9:5:", "modules.decoder_layer.module", "did you mean 'TransformerLayer'"]),
    ("disallowed_import",
     GOOD_MODEL + "modules:\n  decoder_layer:\n    module: 'import:os:system'\n", [],
     [":9:5:", "modules.decoder_layer.module", "--allow-imports"]),
    ("unknown_submodule",
     GOOD_MODEL + "modules:\n  decoder_layer:\n    module: TransformerLayer\n"
     "    submodules:\n      mpl: MLP\n", [],
     ["modules.decoder_layer.submodules.mpl", "did you mean 'mlp'"]),
    ("malformed_yaml", GOOD_MODEL + "mtp: [1, 2\n", [], [":8:", "invalid YAML"]),
    ("missing_file", None, [], ["no such file"]),
    ("empty_file", "", [], ["empty"]),
    ("comment_only_file", "# nothing\n", [], ["empty"]),
    ("override_unknown_key", GOOD_MODEL, ["mtp.num_layrs=2"],
     ["override 'mtp.num_layrs=2'", "did you mean 'num_layers'"]),
    ("override_bad_value", GOOD_MODEL, ["parallel.pipeline=two"],
     ["override 'parallel.pipeline=two'", "parallel.pipeline", "integer"]),
    ("override_malformed", GOOD_MODEL, ["mtp.num_layers"], ["KEY=VALUE"]),
    ("missing_model_section", "mtp:\n  num_layers: 1\n", [], ["model", "required"]),
    ("yaml11_bool_is_not_bool", GOOD_MODEL + "  add_bias_linear: yes\n", [],
     [":7:3:", "model.add_bias_linear", "boolean"]),
    ("tensor_parallel_not_dividing_heads", GOOD_MODEL + "parallel:\n  tensor: 3\n", [],
     [":8:3:", "parallel.tensor", "must divide"]),
    ("group_size_below_pipeline", GOOD_MODEL.replace("num_layers: 2", "num_layers: 4")
     + "parallel:\n  pipeline: 2\n  virtual_pipeline: 2\n"
     "  microbatch_group_size_per_vp_stage: 1\n", [],
     [":10:3:", "parallel.microbatch_group_size_per_vp_stage", "(1) must be at least pipeline (2)"]),
    ("group_size_without_virtual_stages", GOOD_MODEL + "parallel:\n  pipeline: 2\n"
     "  microbatch_group_size_per_vp_stage: 2\n", [],
     [":9:3:", "parallel.microbatch_group_size_per_vp_stage", "needs virtual_pipeline > 1"]),
]


@pytest.mark.parametrize("name,text,extra,fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_located_message(tmp_path: Path, name, text, extra, fragments):
    spec = tmp_path / "spec.yaml"
    if text is not None:
        spec.write_text(text)
    result = run_mtp("build", str(spec), *extra, cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    assert str(spec) in result.stderr or name.startswith("override")
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)
    assert not (tmp_path / "MARKER").exists(), "code from the YAML ran"


def test_import_module_allowed_with_opt_in(tmp_path: Path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(GOOD_MODEL + "modules:\n  decoder_layer:\n    module: TransformerLayer\n"
                    "    submodules:\n"
                    "      input_layernorm: 'import:tests.custom_modules:PlainLayerNorm'\n"
                    "      self_attention: {module: SelfAttention, submodules: "
                    "{linear_qkv: backend.column_parallel_linear, core_attention: "
                    "backend.core_attention, linear_proj: backend.row_parallel_linear}}\n"
                    "      pre_mlp_layernorm: backend.layer_norm\n"
                    "      mlp: {module: MLP, submodules: {linear_fc1: "
                    "backend.column_parallel_linear, linear_fc2: backend.row_parallel_linear}}\n")
    refused = run_mtp("build", str(spec), "--json")
    assert refused.returncode == 2 and "--allow-imports" in refused.stderr
    allowed = run_mtp("build", str(spec), "--json", "--allow-imports")
    assert allowed.returncode == 0, allowed.stderr


def test_te_backend_without_transformer_engine_says_how_to_install(tmp_path: Path):
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        pass
    else:  # pragma: no cover - only where TE is installed
        pytest.skip("Transformer Engine is installed here")
    spec = tmp_path / "spec.yaml"
    spec.write_text(GOOD_MODEL + "  backend: te\n")
    result = run_mtp("build", str(spec))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "pip install" in result.stderr and "CUDA" in result.stderr
