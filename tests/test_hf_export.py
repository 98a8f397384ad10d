"""`mtp export` against transformers' own loaders (CPU, fp32, random weights, no download).

A random mtp-cli model saved as a run directory (DCP, as `mtp train` writes it) is exported,
loaded with `AutoModelForCausalLM.from_pretrained`, and its MTP depths with transformers' own
key conversion for MTP weights (`MtpModel.from_pretrained` for the released DeepSeek-V3 / GLM-4.5
layer counts): the main and every depth's logits equal mtp-cli's to 1e-5.
"""

from __future__ import annotations

import json

import pytest
import torch

from mtp_cli.errors import UserError
from mtp_cli.hf.configs import spec_sections
from mtp_cli.hf.export import export_checkpoint, parse_size
from mtp_cli.hf.export_config import hf_target
from tests.ckpt_helpers import write_dcp_checkpoint
from tests.cli_helpers import SPECS
from tests.hf_models import dense_sections, load_mtp_depths, random_model, read_safetensors_dir
from tests.hf_parity import (
    SEQ,
    ParityPair,
    RoutingRecorder,
    deepseek_config,
    glm_config,
    hf_depth_logits,
    our_depth_logits,
)

pytest.importorskip("transformers")
SEED = 5
DENSE = {
    "llama": ({}, "LlamaForCausalLM"),
    "llama_tied": ({"share_embeddings_and_output_weights": True}, "LlamaForCausalLM"),
    "llama_all_biases": ({"add_bias_linear": True}, "LlamaForCausalLM"),
    "qwen2_qkv_bias": ({"add_qkv_bias": True}, "Qwen2ForCausalLM"),
}


def _export(tmp_path, spec, model, **options):
    run = tmp_path / "run"
    write_dcp_checkpoint(run, spec, model_state=model.state_dict())
    out = tmp_path / "hf"
    export_checkpoint(run, out, **{"shard_size": "40KB", "target": "transformers", **options})
    return out


def _load(out):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()


def _assert_same_logits(theirs, ours):
    assert len(theirs) == len(ours)
    for depth, (hf_logits, our_logits) in enumerate(zip(theirs, ours, strict=True)):
        torch.testing.assert_close(our_logits, hf_logits, atol=1e-5, rtol=0,
                                   msg=f"depth {depth}")


SLOW_CASES = {"llama_tied", "llama_all_biases"}  # the fast tier keeps one case of each class


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES
                                  else c for c in DENSE])
def test_dense_export_loads_with_the_same_main_and_depth_logits(case, tmp_path):
    model_keys, architecture = DENSE[case]
    spec, ours = random_model(dense_sections(**model_keys), SEED)
    out = _export(tmp_path, spec, ours)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [architecture] and config["num_nextn_predict_layers"] == 2
    main = _load(out)
    assert type(main).__name__ == architecture
    mtp = load_mtp_depths(main, out, 2)
    ids = torch.randint(0, spec.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    _assert_same_logits(hf_depth_logits(ParityPair(main, mtp, ours), ids),
                        our_depth_logits(ours, ids))
    files = read_safetensors_dir(out)
    for k in (2, 3):  # the depths' copies of the embedding and head serving engines read
        assert torch.equal(files[f"model.layers.{k}.embed_tokens.weight"],
                           files["model.embed_tokens.weight"])
        head = "model.embed_tokens.weight" if "tied" in case else "lm_head.weight"
        assert torch.equal(files[f"model.layers.{k}.shared_head.head.weight"], files[head])
    assert ("lm_head.weight" in files) == ("tied" not in case)


@pytest.mark.parametrize("make_config", [
    deepseek_config, pytest.param(glm_config, marks=pytest.mark.slow)], ids=["deepseek_v3",
                                                                             "glm4_moe"])
def test_moe_export_loads_with_the_same_experts_and_logits(make_config, tmp_path):
    config = make_config(num_mtp_layers=2)
    sections, _ = spec_sections(config, seq_length=SEQ)
    spec, ours = random_model(sections, SEED)
    out = _export(tmp_path, spec, ours)
    main = _load(out)
    mtp = load_mtp_depths(main, out, 2)
    files = read_safetensors_dir(out)
    assert "model.layers.2.mlp.experts.7.gate_proj.weight" in files  # one tensor per expert
    pair = ParityPair(main, mtp, ours)
    recorder = RoutingRecorder(pair)
    ids = torch.randint(0, config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(2))
    theirs, mine = hf_depth_logits(pair, ids), our_depth_logits(ours, ids)
    recorder.remove()
    assert len(recorder.hf) == len(recorder.ours) == 3
    assert all(torch.equal(a, b) for a, b in zip(recorder.hf, recorder.ours, strict=True))
    _assert_same_logits(theirs, mine)


RELEASED = {"deepseek_v3": (deepseek_config, 61, 3), "glm4_moe": (glm_config, 46, 1)}


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(RELEASED))
@pytest.mark.parametrize("depths", [1, 2])
def test_released_layer_counts_load_mtp_through_transformers(arch, depths, tmp_path):
    """61 (DeepSeek-V3) / 46 (GLM-4.5-Air) decoder layers at tiny widths, where transformers
    looks for the MTP layer: `MtpModel.from_pretrained` finds depth 1 at model.layers.61 / .46
    (it loads one depth); two depths load through its key conversion for MTP weights."""
    from transformers.modeling_layers import MtpModel

    make_config, layers, dense = RELEASED[arch]
    config = make_config(num_hidden_layers=layers, first_k_dense_replace=dense,
                         num_mtp_layers=depths)
    sections, _ = spec_sections(config, seq_length=SEQ)
    spec, ours = random_model(sections, SEED)
    out = _export(tmp_path, spec, ours, shard_size="2MB")
    main = _load(out)
    assert any(f"model.layers.{layers}." in k for k in read_safetensors_dir(out))
    mtp = MtpModel.from_pretrained(main).eval() if depths == 1 else \
        load_mtp_depths(main, out, depths)
    pair = ParityPair(main, mtp, ours)
    recorder = RoutingRecorder(pair)
    ids = torch.randint(0, config.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(3))
    theirs, mine = hf_depth_logits(pair, ids), our_depth_logits(ours, ids)
    recorder.remove()
    assert len(recorder.hf) == len(recorder.ours) == layers - dense + depths
    assert all(torch.equal(a, b) for a, b in zip(recorder.hf, recorder.ours, strict=True))
    _assert_same_logits(theirs, mine)


def test_export_reads_the_checkpoint_once_per_shard(tmp_path, monkeypatch):
    """Streaming: one checkpoint read (one DCP load) per output shard, never one per tensor."""
    import mtp_cli.inspect.checkpoint as checkpoint_module

    reads: list[list[str]] = []
    opener = checkpoint_module.open_checkpoint

    def counting_open(path):
        checkpoint = opener(path)
        inner = checkpoint.reader
        checkpoint.reader = lambda names: reads.append(list(names)) or inner(names)
        return checkpoint

    monkeypatch.setattr(checkpoint_module, "open_checkpoint", counting_open)
    spec, ours = random_model(dense_sections(), SEED)
    out = _export(tmp_path, spec, ours, shard_size="30KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and len(reads) == len(shards)
    assert sum(len(r) for r in reads) < len(index["weight_map"])  # many tensors per read
    for shard in shards:  # within --shard-size (+ its header), or one tensor too big for it
        held = [k for k, v in index["weight_map"].items() if v == shard]
        assert (out / shard).stat().st_size < 30_000 + 1_000 or (
            len(held) == 1 and held[0].endswith(("embed_tokens.weight", "lm_head.weight",
                                                 "shared_head.head.weight"))), (shard, held)


def test_export_dtype_option_and_default(tmp_path):
    spec, ours = random_model(dense_sections(depths=1), SEED)
    out = _export(tmp_path, spec, ours)
    assert {t.dtype for t in read_safetensors_dir(out).values()} == {torch.float32}
    bf16 = tmp_path / "bf16"
    export_checkpoint(tmp_path / "run", bf16, dtype="bf16", target="transformers")
    files, full = read_safetensors_dir(bf16), read_safetensors_dir(out)
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(files[k].dtype == torch.bfloat16 and torch.equal(files[k], full[k].bfloat16())
               for k in full)


def test_byte_tokenizer_loads_with_auto_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from mtp_cli.data.tokenizer import ByteTokenizer

    spec, ours = random_model(dense_sections(depths=0), SEED)
    out = _export(tmp_path, spec, ours)
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = "def f(x):\n\treturn x  # é ü\x00"
    assert tokenizer(text, add_special_tokens=False).input_ids == \
        ByteTokenizer().encode(text).tolist()
    assert tokenizer.eos_token_id == 256
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 256


def test_gpt_125m_is_refused_with_the_reason():
    from mtp_cli import load_spec

    with pytest.raises(UserError, match="normalization LayerNorm"):
        hf_target(load_spec(SPECS / "gpt_125m.yaml"), dtype=torch.float32)
    for keys, reason in (({"activation": "gelu"}, "activation gelu"),
                         ({"position_embedding": "learned_absolute"}, "position_embedding"),
                         ({"qk_layernorm": True}, "qk_layernorm"),
                         ({"rotary_percent": 0.5}, "rotary_percent")):
        from mtp_cli import load_spec as load

        with pytest.raises(UserError, match=reason):
            hf_target(load(dense_sections(**keys)), dtype=torch.float32)


def test_moe_export_refusals_name_the_key():
    from mtp_cli import load_spec

    sections, _ = spec_sections(deepseek_config(), seq_length=SEQ)
    for changes, reason, key in (
            ({"moe_router_score_function": "softmax"}, "softmax", "moe_router_score_function"),
            ({"moe_router_topk": 2}, "top 1 scores", "moe_router_group_topk"),
            ({"moe_layer_freq": [1, 0]}, "moe_layer_freq", "moe_layer_freq"),
            ({"moe_router_enable_expert_bias": False}, "no expert bias",
             "moe_router_enable_expert_bias")):
        changed = json.loads(json.dumps(sections))
        changed["model"].update(changes)
        with pytest.raises(UserError, match=reason) as error:
            hf_target(load_spec(changed), dtype=torch.float32)
        assert error.value.problems[0].key == f"model.{key}"


def test_export_bad_input_exits_2_and_writes_nothing(tmp_path):
    spec, ours = random_model(dense_sections(normalization="LayerNorm"), SEED)
    run = tmp_path / "run"
    write_dcp_checkpoint(run, spec, model_state=ours.state_dict())
    out = tmp_path / "out"
    with pytest.raises(UserError, match="normalization LayerNorm"):
        export_checkpoint(run, out)
    with pytest.raises(UserError, match="nowhere"):
        export_checkpoint(tmp_path / "nowhere", out)
    state_dict = tmp_path / "model.pt"
    torch.save(ours.state_dict(), state_dict)
    with pytest.raises(UserError, match="--spec"):
        export_checkpoint(state_dict, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "run"]
    out.mkdir()
    with pytest.raises(UserError, match="already exists") as error:
        export_checkpoint(run, out)
    assert error.value.problems[0].file == str(out) and "--overwrite" in error.value.render()
    assert list(out.iterdir()) == []


def test_shard_size_parsing():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("500mb") == 5 * 10**8 and parse_size("1024") == 1024
    with pytest.raises(UserError, match="--shard-size"):
        parse_size("lots")


@pytest.mark.parametrize("sections", [
    dense_sections(), dense_sections(add_qkv_bias=True, share_embeddings_and_output_weights=True),
    dense_sections(add_bias_linear=True, kv_channels=16),
    spec_sections(deepseek_config(), seq_length=SEQ)[0], spec_sections(glm_config(), seq_length=SEQ)[0],
], ids=["llama", "qwen2_tied", "llama_biases_head_dim", "deepseek_v3", "glm4_moe"])
def test_config_json_translates_back_to_the_same_model(sections):
    """Export's config.json read by import's translation gives the same `model` section (the
    keys a run spec would state)."""
    from mtp_cli import load_spec

    spec = load_spec(sections)
    target = hf_target(spec, dtype=torch.float32)
    back, _ = spec_sections(target.config, seq_length=spec.model.seq_length)
    again = load_spec(back)
    inference_only = {"moe_router_load_balancing_type", "moe_aux_loss_coeff",
                      "moe_router_bias_update_rate", "moe_router_pre_softmax"}
    ours, theirs = spec.model.model_dump(), again.model.model_dump()
    assert {k: v for k, v in ours.items() if k not in inference_only} == \
        {k: v for k, v in theirs.items() if k not in inference_only}
    assert again.mtp.num_layers == spec.mtp.num_layers


def test_a_repeated_mtp_layer_is_written_at_every_depth(tmp_path):
    sections = dense_sections()
    sections["mtp"]["use_repeated_layer"] = True
    spec, ours = random_model(sections, SEED)
    out = _export(tmp_path, spec, ours)
    files = read_safetensors_dir(out)
    assert torch.equal(files["model.layers.2.eh_proj.weight"], files["model.layers.3.eh_proj.weight"])
    main = _load(out)
    mtp = load_mtp_depths(main, out, 2)
    ids = torch.randint(0, spec.model.vocab_size, (1, 16), generator=torch.Generator().manual_seed(6))
    _assert_same_logits(hf_depth_logits(ParityPair(main, mtp, ours), ids),
                        our_depth_logits(ours, ids))
