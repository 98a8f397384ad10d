"""Parameter counts of MoE and MLA models: by hand for a small spec, against transformers'
DeepSeek-V3 and GLM-4.5-Air built on the meta device for the published specs, and per stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtp_cli import build_model, load_spec
from mtp_cli.facts.counts import count_parameters
from mtp_cli.facts.describe import describe_build
from mtp_cli.hf.configs import spec_sections
from mtp_cli.plan.placement import build_stage_plan
from tests.cli_helpers import run_mtp

DATA = Path(__file__).resolve().parent / "data"
SMALL_MOE = {
    "vocab_size": 96, "hidden_size": 32, "num_layers": 3, "num_attention_heads": 4,
    "ffn_hidden_size": 80, "seq_length": 16, "normalization": "RMSNorm",
    "activation": "swiglu", "position_embedding": "rope", "add_bias_linear": False,
    "multi_latent_attention": True, "q_lora_rank": 24, "kv_lora_rank": 16, "qk_head_dim": 12,
    "qk_pos_emb_head_dim": 8, "v_head_dim": 10, "qk_layernorm": True,
    "num_moe_experts": 6, "moe_router_topk": 2, "moe_ffn_hidden_size": 20,
    "moe_shared_expert_intermediate_size": 40, "moe_layer_freq": [0, 1, 1],
}


def test_moe_mla_counts_by_hand():
    """h 32, 4 heads: MLA 32x24 + 24 + 24x80 + 32x24 + 16 + 16x88 + 40x32 = 6,184 per layer."""
    h, v, heads = 32, 96, 4
    mla = h * 24 + 24 + 24 * heads * 20 + h * (16 + 8) + 16 + 16 * heads * 22 + heads * 10 * h
    assert mla == 6_184
    dense_mlp = h * 2 * 80 + 80 * h
    expert = h * 2 * 20 + 20 * h  # one routed expert: 1,920
    moe_mlp = 6 * h + 6 * expert + (h * 2 * 40 + 40 * h)  # router, experts, shared expert
    norms = 2 * h
    dense_layer, moe_layer = norms + mla + dense_mlp, norms + mla + moe_mlp
    mtp_layer = 3 * h + 2 * h * h + moe_layer  # enorm, hnorm, final norm, eh_proj, layer
    spec = load_spec({"model": SMALL_MOE, "mtp": {"num_layers": 2}})
    counts = count_parameters(build_model(spec, "meta"))
    assert counts.embedding == counts.output_layer == v * h
    assert counts.decoder == dense_layer + 2 * moe_layer + h
    assert counts.mtp == [mtp_layer, mtp_layer]
    assert counts.experts == 2 * 6 * expert
    # activated: the main model less the 6 - 2 experts per MoE decoder layer a token skips
    assert counts.activated == 2 * v * h + counts.decoder - 2 * (6 - 2) * expert
    real = build_model(spec, "cpu")
    assert sum(p.numel() for p in real.parameters()) == counts.unique


@pytest.mark.parametrize("layout,pipeline,tied", [
    ("Ett|tm|L", 3, False), ("Et|t|t|mL", 2, True), ("E|t|t|t|m|L", 3, True)])
def test_stage_counts_equal_building_each_stage(layout, pipeline, tied):
    spec = load_spec({
        "model": {**SMALL_MOE, "share_embeddings_and_output_weights": tied},
        "mtp": {"num_layers": 1},
        "parallel": {"pipeline": pipeline, "layout": layout, "expert": 2},
    })
    report = describe_build(spec)
    for entry, stage in zip(build_stage_plan(spec).stages, report.extra["stages"], strict=True):
        built = build_model(spec, "meta", stage=entry)
        assert stage["parameters"] == sum(p.numel() for p in built.parameters())
        experts = sum(p.numel() for n, p in built.named_parameters() if ".local_experts." in n)
        assert stage["routed_experts"] == experts
        assert stage["parameters_per_expert_rank"] == stage["parameters"] - experts // 2


def _hf_counts(name: str) -> tuple[object, int, int]:
    """(config, main-model parameters, MTP module's own parameters) from transformers, meta."""
    import torch
    from transformers import AutoModelForCausalLM, DeepseekV3Config, Glm4MoeConfig
    from transformers.modeling_layers import MtpModel

    published = json.loads((DATA / f"{name}_config.json").read_text())
    config_class = {"deepseek_v3": DeepseekV3Config, "glm4_moe": Glm4MoeConfig}[
        published["model_type"]]
    config = config_class(**{k: v for k, v in published.items()
                             if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        main = AutoModelForCausalLM.from_config(config)
        mtp = MtpModel(main, config.num_mtp_layers)
    shared = {id(p) for p in main.parameters()}
    own = sum(p.numel() for p in mtp.parameters() if id(p) not in shared)
    return config, sum(p.numel() for p in main.parameters()), own


ARCHITECTURE_KEYS = ("seq_length", "max_position_embeddings", "init_method_std")


@pytest.mark.slow
@pytest.mark.parametrize("name,spec_file,quoted_activated", [
    ("deepseek_v3", "specs/deepseek_v3.yaml", 37e9),
    ("glm4_5_air", "specs/glm4_5_air.yaml", None),
])
def test_published_specs_count_like_transformers(name, spec_file, quoted_activated):
    pytest.importorskip("transformers")
    config, hf_main, hf_mtp = _hf_counts(name)
    result = run_mtp("build", spec_file, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    counts = report["parameters"]
    assert counts["embedding"] + counts["decoder"] + counts["output_layer"] == hf_main
    assert counts["mtp"] == [hf_mtp]
    if quoted_activated is not None:
        assert abs(counts["activated"] - quoted_activated) < 1e9
    assert 0 < counts["experts"] < counts["decoder"]
    stages = report["stages"]
    embedding_copies = sum(1 for s in stages if s["mtp_layers"] and not s["embedding"])
    assert sum(s["parameters"] for s in stages) == counts["total"] + embedding_copies * \
        counts["embedding"]
    # the spec file is the published model: its model keys are what the config translates to
    translated, _ = spec_sections(config)
    ours = load_spec(spec_file).model.model_dump()
    theirs = load_spec(translated).model.model_dump()
    differing = {k for k in ours if ours[k] != theirs[k] and k not in ARCHITECTURE_KEYS
                 and not k.startswith(("moe_router_load_balancing", "moe_aux_loss",
                                       "moe_router_pre_softmax", "moe_router_bias_update"))}
    assert differing == set()
