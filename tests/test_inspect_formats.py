"""State dicts not written by `mtp train`: Megatron checkpoints with `_extra_state` and args,
files that `weights_only` refuses (read without unpickling anything), Hugging Face names."""

from __future__ import annotations

import argparse
import io
import os

import torch

from mtp_cli.inspect import inspect_checkpoint, open_checkpoint
from tests.inspect_fixtures import check, invoke_json, reference_state_dict, save_state_dict


class _Evil:
    """Unpickling this object would create a file: it must never happen."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def _megatron_checkpoint(state: dict) -> dict:
    """Like Megatron's `model_optim_rng.pt`: model state dict with `_extra_state`, args, iteration."""
    model = dict(state)
    model["decoder.layers.0.self_attention.core_attention._extra_state"] = io.BytesIO(b"te fp8")
    model["decoder.layers.1.self_attention.core_attention._extra_state"] = None
    model["mtp.layers.0.mtp_model_layer.self_attention._extra_state"] = torch.tensor([1, 2])
    return {"model": model, "args": argparse.Namespace(lr=1e-4, mtp_num_layers=2),
            "iteration": 700, "checkpoint_version": 3.0}


def test_megatron_checkpoint_with_extra_state_and_args(tmp_path):
    state = reference_state_dict()
    path = save_state_dict(tmp_path / "model_optim_rng.pt", _megatron_checkpoint(state))
    code, out = invoke_json("inspect-ckpt", path, "--strict")
    assert code == 0, out["checks"]
    assert out["skipped"]["count"] == 3
    assert all(n.endswith("_extra_state") for n in out["skipped"]["names"])
    assert out["step"] == 700
    assert out["layout"]["mtp_depths"] == 2
    assert any("restricted reader" in note for note in out["notes"])
    assert out["parameters"]["stored"] == 59712


def test_restricted_reader_rebuilds_tensors_exactly(tmp_path):
    state = reference_state_dict()
    state["mtp.layers.0.embedding.word_embeddings.weight"] = \
        state["embedding.word_embeddings.weight"]  # shares storage in the file
    bf16 = state["output_layer.weight"].to(torch.bfloat16)
    state["extra.bf16_view"] = bf16[3:9, 2:]  # a strided view with a storage offset
    path = save_state_dict(tmp_path / "m.pt", _megatron_checkpoint(state))
    checkpoint = open_checkpoint(path)
    names = list(state)
    loaded = checkpoint.read(names)
    for name in names:
        assert loaded[name].dtype == state[name].dtype
        assert torch.equal(loaded[name], state[name]), name


def test_pickled_code_is_never_run(tmp_path):
    target = tmp_path / "pwned"
    state = reference_state_dict()
    state["decoder.layers.0.self_attention._extra_state"] = _Evil(str(target))
    path = save_state_dict(tmp_path / "evil.pt", {"model": state, "hook": _Evil(str(target))})
    report = inspect_checkpoint(path)
    assert not target.exists()
    assert any("restricted reader" in note for note in report.checkpoint.notes)
    assert report.passed
    assert report.checkpoint.skipped == ["decoder.layers.0.self_attention._extra_state"]


def test_plain_state_dict_loads_with_weights_only(tmp_path):
    path = save_state_dict(tmp_path / "plain.pt", reference_state_dict())
    checkpoint = open_checkpoint(path)
    assert checkpoint.notes == [] and checkpoint.skipped == []


def _hf_deepseek_state(num_layers: int = 2, hidden: int = 16, vocab: int = 40) -> dict:
    """A tiny state dict with Hugging Face DeepSeek-V3 names and one MTP layer (index N)."""
    torch.manual_seed(0)
    state = {"model.embed_tokens.weight": torch.randn(vocab, hidden),
             "model.norm.weight": torch.ones(hidden), "lm_head.weight": torch.randn(vocab, hidden)}
    for layer in range(num_layers + 1):
        p = f"model.layers.{layer}."
        state[p + "input_layernorm.weight"] = torch.ones(hidden)
        state[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
        state[p + "self_attn.q_proj.weight"] = torch.randn(hidden, hidden)
        state[p + "self_attn.o_proj.weight"] = torch.randn(hidden, hidden)
        state[p + "mlp.gate_proj.weight"] = torch.randn(2 * hidden, hidden)
    p = f"model.layers.{num_layers}."
    state[p + "enorm.weight"] = torch.ones(hidden)
    state[p + "hnorm.weight"] = torch.ones(hidden)
    state[p + "eh_proj.weight"] = torch.randn(hidden, 2 * hidden)
    state[p + "shared_head.norm.weight"] = torch.ones(hidden)
    state[p + "embed_tokens.weight"] = state["model.embed_tokens.weight"].clone()
    state[p + "shared_head.head.weight"] = state["lm_head.weight"].clone()
    return state


def test_hugging_face_deepseek_names_equal_copies_pass(tmp_path):
    path = save_state_dict(tmp_path / "hf.pt", _hf_deepseek_state())
    code, out = invoke_json("inspect-ckpt", path, "--strict")
    assert code == 0, out["checks"]
    layout = out["layout"]
    assert layout["naming"] == "huggingface"
    assert (layout["num_layers"], layout["mtp_depths"]) == (2, 1)
    assert layout["mtp_depths_present"] == ["model.layers.2"]
    ties = check(out, "mtp_ties")
    assert {(d["copy"], d["main"], d["status"]) for d in ties["details"]} == {
        ("model.layers.2.embed_tokens.weight", "model.embed_tokens.weight", "equal"),
        ("model.layers.2.shared_head.head.weight", "lm_head.weight", "equal"),
    }
    assert "model.layers.2.embed_tokens.weight" in ties["note"]
    parts = {p["part"]: p["tensors"] for p in out["parts"]}
    assert parts["mtp_1"] == 11 and parts["decoder"] == 11


def test_hugging_face_differing_shared_head_fails(tmp_path):
    state = _hf_deepseek_state()
    state["model.layers.2.shared_head.head.weight"][0, 0] += 2.0
    code, out = invoke_json("inspect-ckpt", save_state_dict(tmp_path / "hf.pt", state),
                            "--strict")
    assert code == 1
    ties = check(out, "mtp_ties")
    assert ties["tensors"] == ["model.layers.2.shared_head.head.weight"]
    assert "max abs difference 2" in ties["reason"]


def test_hugging_face_eh_proj_shape_checked(tmp_path):
    state = _hf_deepseek_state()
    state["model.layers.2.eh_proj.weight"] = torch.zeros(16, 30)
    code, out = invoke_json("inspect-ckpt", save_state_dict(tmp_path / "hf.pt", state))
    assert code == 0  # without --strict a failure still exits 0
    assert check(out, "shapes")["tensors"] == ["model.layers.2.eh_proj.weight"]


def test_file_left_untouched_by_inspection(tmp_path):
    path = save_state_dict(tmp_path / "ref.pt", reference_state_dict())
    before = (path.stat().st_mtime_ns, path.stat().st_size)
    inspect_checkpoint(path)
    assert (path.stat().st_mtime_ns, path.stat().st_size) == before
    assert sorted(os.listdir(tmp_path)) == ["ref.pt"]
