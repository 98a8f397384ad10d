"""`mtp inspect-ckpt` on Megatron-Core 0.19.2's own state dict (no spec), and after tampering."""

from __future__ import annotations

import pytest

from tests.inspect_fixtures import (
    check,
    invoke,
    invoke_json,
    reference_config,
    reference_spec_yaml,
    reference_state_dict,
    save_state_dict,
)

H, FFN, V = 32, 128, 64  # the reference configuration (asserted against its JSON below)


def _layer_parameters(h: int, ffn: int) -> int:
    """One transformer layer with biases and LayerNorm (Megatron local spec), by hand."""
    norms = 2 * (2 * h)
    attention = (3 * h * h + 3 * h) + (h * h + h)
    mlp = (ffn * h + ffn) + (h * ffn + h)
    return norms + attention + mlp


def _mtp_depth_parameters(h: int, ffn: int) -> int:
    """enorm, hnorm (weight+bias), eh_proj [h, 2h] (no bias), one layer, final norm."""
    return 2 * (2 * h) + 2 * h * h + _layer_parameters(h, ffn) + 2 * h


def _depth(state: dict, index: int) -> dict:
    return {k: v for k, v in state.items() if k.startswith(f"mtp.layers.{index}.")}


def test_reference_configuration_is_what_the_hand_counts_assume():
    config = reference_config()["config"]
    assert (config["hidden_size"], config["ffn_hidden_size"], config["vocab_size"]) == (H, FFN, V)


def test_reference_state_dict_recognises_two_depths(tmp_path):
    path = save_state_dict(tmp_path / "ref.pt", reference_state_dict())
    code, out = invoke_json("inspect-ckpt", path, "--strict")
    assert code == 0 and out["passed"]
    layout = out["layout"]
    assert layout["mtp_depths"] == 2 and layout["mtp_depths_source"] == "keys"
    assert layout["mtp_depths_present"] == ["mtp.layers.0", "mtp.layers.1"]
    assert layout["mtp_transformer_layer_name"] == "mtp_model_layer"
    assert (layout["num_layers"], layout["hidden_size"], layout["vocab_size"]) == (2, H, V)
    assert layout["tied_output"] is False
    # Megatron counted 59,712 parameters for this model.
    assert out["parameters"]["stored"] == reference_config()["n_params"]
    parts = {p["part"]: p for p in out["parts"]}
    assert parts["mtp_1"]["parameters"] == parts["mtp_2"]["parameters"] == \
        _mtp_depth_parameters(H, FFN)
    assert parts["decoder"]["parameters"] == 2 * _layer_parameters(H, FFN) + 2 * H
    assert parts["output_layer"]["parameters"] == V * H
    assert check(out, "mtp_ties")["reason"].startswith("no separate copies stored")


def test_reference_matches_a_spec_of_its_configuration(tmp_path):
    """Our model's names and shapes are Megatron-Core's (the legacy spelling accepted)."""
    path = save_state_dict(tmp_path / "ref.pt", reference_state_dict())
    spec = reference_spec_yaml(tmp_path / "ref.yaml")
    code, out = invoke_json("inspect-ckpt", path, "--spec", spec, "--strict")
    assert code == 0, out["checks"]
    assert out["spec_source"] == "--spec"
    assert out["parameters"]["expected"] == out["parameters"]["stored"] == 59712
    assert all(p["expected_parameters"] == p["parameters"] for p in out["parts"])


def test_transformer_layer_spelling_is_recognised_too(tmp_path):
    state = {k.replace(".mtp_model_layer.", ".transformer_layer."): v
             for k, v in reference_state_dict().items()}
    code, out = invoke_json("inspect-ckpt", save_state_dict(tmp_path / "ref.pt", state),
                            "--strict")
    assert code == 0
    assert out["layout"]["mtp_transformer_layer_name"] == "transformer_layer"
    assert out["layout"]["mtp_depths"] == 2


def test_middle_depth_removed_fails_and_names_it(tmp_path):
    state = reference_state_dict()
    for name, tensor in _depth(state, 1).items():  # a third depth: copy of the second
        state[name.replace("mtp.layers.1.", "mtp.layers.2.")] = tensor.clone()
    code, out = invoke_json("inspect-ckpt", save_state_dict(tmp_path / "d3.pt", state))
    assert code == 0 and out["layout"]["mtp_depths"] == 3 and out["passed"]
    for name in _depth(state, 1):
        del state[name]
    result = invoke("inspect-ckpt", save_state_dict(tmp_path / "gap.pt", state), "--strict")
    assert result.exit_code == 1
    assert "FAIL  mtp_depths" in result.stdout and "missing mtp.layers.1" in result.stdout
    _, out = invoke_json("inspect-ckpt", tmp_path / "gap.pt")
    depths = check(out, "mtp_depths")
    assert not depths["passed"] and depths["tensors"] == ["mtp.layers.1"]


def test_first_of_two_depths_removed_fails(tmp_path):
    state = reference_state_dict()
    for name in _depth(state, 0):
        del state[name]
    code, out = invoke_json("inspect-ckpt", save_state_dict(tmp_path / "ref.pt", state),
                            "--strict")
    assert code == 1
    assert check(out, "mtp_depths")["tensors"] == ["mtp.layers.0"]


def test_depth_missing_a_tensor_fails_and_names_it(tmp_path):
    state = reference_state_dict()
    del state["mtp.layers.1.eh_proj.weight"]
    code, out = invoke_json("inspect-ckpt", save_state_dict(tmp_path / "ref.pt", state),
                            "--strict")
    assert code == 1
    assert check(out, "mtp_depths")["tensors"] == ["mtp.layers.1.eh_proj.weight"]


@pytest.mark.parametrize("copy_tail,main", [
    ("embedding.word_embeddings.weight", "embedding.word_embeddings.weight"),
    ("output_layer.weight", "output_layer.weight"),
])
def test_equal_mtp_copy_passes_with_a_note(tmp_path, copy_tail, main):
    state = reference_state_dict()
    state[f"mtp.layers.1.{copy_tail}"] = state[main].clone()
    code, out = invoke_json("inspect-ckpt", save_state_dict(tmp_path / "ref.pt", state),
                            "--strict")
    assert code == 0
    ties = check(out, "mtp_ties")
    assert ties["passed"] and f"mtp.layers.1.{copy_tail}" in ties["note"]
    assert ties["details"] == [{"copy": f"mtp.layers.1.{copy_tail}", "main": main,
                                "status": "equal", "max_abs_diff": 0.0}]


def test_differing_mtp_copy_fails_with_its_max_abs_difference(tmp_path):
    state = reference_state_dict()
    main = state["embedding.word_embeddings.weight"]
    copy = main.clone()
    copy[7, 3] += 0.5
    copy[2, 1] -= 0.125
    state["mtp.layers.0.embedding.word_embeddings.weight"] = copy
    expected = abs(float(copy[7, 3]) - float(main[7, 3]))  # the larger of the two changes
    result = invoke("inspect-ckpt", save_state_dict(tmp_path / "ref.pt", state), "--strict")
    assert result.exit_code == 1
    assert "mtp.layers.0.embedding.word_embeddings.weight differs from " \
           "embedding.word_embeddings.weight: max abs difference" in result.stdout
    _, out = invoke_json("inspect-ckpt", tmp_path / "ref.pt")
    ties = check(out, "mtp_ties")
    assert not ties["passed"]
    assert ties["tensors"] == ["mtp.layers.0.embedding.word_embeddings.weight"]
    assert ties["details"][0]["max_abs_diff"] == pytest.approx(expected, rel=0, abs=1e-7)


@pytest.mark.parametrize("name,shape", [
    ("mtp.layers.1.eh_proj.weight", (32, 60)),
    ("mtp.layers.0.final_layernorm.weight", (31,)),
    ("output_layer.weight", (65, 32)),
])
def test_shape_change_fails_and_names_the_tensor(tmp_path, name, shape):
    state = reference_state_dict()
    state[name] = state[name].new_zeros(shape)
    code, out = invoke_json("inspect-ckpt", save_state_dict(tmp_path / "ref.pt", state),
                            "--strict")
    assert code == 1
    shapes = check(out, "shapes")
    assert shapes["tensors"] == [name]
    assert list(shape) == shapes["details"][0]["shape"]


def test_shape_change_inside_a_layer_is_named(tmp_path):
    """No rule fixes an MLP width; the two disagreeing layers are both named."""
    state = reference_state_dict()
    name = "mtp.layers.1.mtp_model_layer.mlp.linear_fc1.weight"
    state[name] = state[name].new_zeros(120, H)
    code, out = invoke_json("inspect-ckpt", save_state_dict(tmp_path / "ref.pt", state),
                            "--strict")
    assert code == 1
    assert name in check(out, "shapes")["tensors"]


def test_shape_change_against_a_spec_names_only_that_tensor(tmp_path):
    state = reference_state_dict()
    name = "decoder.layers.1.mlp.linear_fc1.weight"
    state[name] = state[name].new_zeros(120, H)
    spec = reference_spec_yaml(tmp_path / "ref.yaml")
    result = invoke("inspect-ckpt", save_state_dict(tmp_path / "ref.pt", state), "--spec", spec,
                    "--strict")
    assert result.exit_code == 1
    assert f"{name} is (120, 32), spec says (128, 32)" in result.stdout
