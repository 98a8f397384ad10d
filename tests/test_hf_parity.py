"""Against Hugging Face transformers (CPU, fp32, random weights, no download): tiny
DeepseekV3ForCausalLM and Glm4MoeForCausalLM loaded into mtp-cli through `mtp_cli.hf.mapping`
route every token to the same experts, then give the same main and per-MTP-depth logits."""

from __future__ import annotations

import pytest
import torch

from mtp_cli.hf.configs import spec_sections
from mtp_cli.hf.mapping import ARCHITECTURES, hf_to_megatron, megatron_to_hf
from tests.hf_parity import (
    SEQ,
    RoutingRecorder,
    build_pair,
    deepseek_config,
    glm_config,
    hf_depth_logits,
    our_depth_logits,
    selection_margin,
)

pytest.importorskip("transformers")

SEED = 4  # every routing decision of these cases has a margin above 2e-3 (asserted below)
CASES = {
    "deepseek_v3": lambda: deepseek_config(),
    "deepseek_v3_rope_not_interleaved": lambda: deepseek_config(rope_interleave=False),
    "glm4_moe": lambda: glm_config(),
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_experts_then_same_logits_at_every_depth(case):
    config = CASES[case]()
    pair = build_pair(config, SEED)
    recorder = RoutingRecorder(pair)
    ids = torch.randint(0, config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(SEED))
    theirs = hf_depth_logits(pair, ids)
    ours = our_depth_logits(pair.ours, ids)
    recorder.remove()
    # one MoE decoder layer and one per MTP depth, called once each, in the same order
    assert len(recorder.hf) == len(recorder.ours) == 1 + config.num_mtp_layers
    for index, (hf_map, our_map) in enumerate(zip(recorder.hf, recorder.ours, strict=True)):
        assert int(our_map.sum(dim=-1).unique()) == config.num_experts_per_tok
        assert torch.equal(hf_map, our_map), f"router call {index} chose other experts"
    for scores in recorder.hf_scores:
        assert selection_margin(scores, *recorder.groups) > 2e-3
    assert len(theirs) == len(ours) == 1 + config.num_mtp_layers
    for depth, (hf_logits, our_logits) in enumerate(zip(theirs, ours, strict=True)):
        torch.testing.assert_close(our_logits, hf_logits, atol=1e-5, rtol=0,
                                   msg=f"depth {depth}")
    with torch.no_grad():  # the model's own forward gives the main logits too
        torch.testing.assert_close(pair.ours(ids), theirs[0], atol=1e-5, rtol=0)


def test_deepseek_case_exercises_yarn_groups_and_expert_bias():
    config = deepseek_config()
    rope = config.rope_parameters
    assert rope["rope_type"] == "yarn" and rope["factor"] > 1
    assert rope["mscale"] != rope["mscale_all_dim"] and rope["original_max_position_embeddings"] < SEQ
    sections, _ = spec_sections(config, seq_length=SEQ)
    model = sections["model"]
    assert model["rope_type"] == "yarn" and model["moe_layer_freq"] == [0, 1]
    assert model["moe_router_num_groups"] == 4 and model["moe_router_group_topk"] == 2
    assert model["moe_router_topk"] == 4 and model["moe_router_enable_expert_bias"]
    pair = build_pair(config, SEED)
    bias = pair.ours.decoder.layers["1"].mlp.router.expert_bias
    assert bias.abs().min() > 0


@pytest.mark.parametrize("case", list(CASES))
def test_mapping_round_trips(case):
    config = CASES[case]()
    pair = build_pair(config, SEED)
    _, context = spec_sections(config, seq_length=SEQ)
    arch = ARCHITECTURES[config.model_type]
    ours = pair.ours.state_dict()
    back = hf_to_megatron(arch, megatron_to_hf(arch, ours, context), context)
    assert back.keys() == ours.keys()
    for name, tensor in ours.items():
        assert torch.equal(back[name], tensor), name
    hf = megatron_to_hf(arch, ours, context)
    reference = {**pair.hf_main.state_dict(),
                 **{f"mtp.{k}": v for k, v in pair.hf_mtp.state_dict().items()
                    if not k.endswith(("embed_tokens.weight", "shared_head.weight"))}}
    assert hf.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(hf[name], tensor), name
