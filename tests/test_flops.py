"""Model FLOPs per step against hand counts: the closed form of Narayanan et al. (2021) for a
plain GPT (72 B s l h^2 (1 + s/(12h) + V/(12 l h)) with causal-halved attention), each MTP depth
as one more layer plus its norms, eh_proj and logits, and an MoE + MLA model counted by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtp_cli import load_spec
from mtp_cli.plan.flops import flops_per_token, num_floating_point_operations

TINY = Path(__file__).resolve().parents[1] / "specs" / "tiny.yaml"
GPT = ["model.num_query_groups=4", "model.activation=gelu", "model.ffn_hidden_size=256"]


@pytest.mark.parametrize("depths", [0, 2])
def test_plain_gpt_matches_the_closed_form(depths):
    spec = load_spec(TINY, [*GPT, f"mtp.num_layers={depths}"])
    b, s, layers, h, vocab = 16, 64, 4, 64, 320
    main = 72 * b * s * layers * h**2 * (1 + s / (12 * h) + vocab / (12 * layers * h))
    per_depth = (72 * b * s * h**2 * (1 + s / (12 * h))  # its transformer layer
                 + 6 * b * s * (3 * h + 2 * h * h)  # enorm, hnorm, final norm; eh_proj
                 + 6 * b * s * h * vocab)  # its logits
    expected = main + depths * per_depth
    assert num_floating_point_operations(spec, b) == pytest.approx(expected, rel=1e-12)
    assert flops_per_token(spec) == pytest.approx(expected / (b * s), rel=1e-12)


def test_grouped_queries_and_swiglu_by_hand():
    """tiny.yaml itself: 4 heads over 2 query groups of 16, SwiGLU ffn 192, D = 2."""
    spec = load_spec(TINY)
    h, s, vocab, layers = 64, 64, 320, 4 + 2
    attention = 6 * (h * (64 + 2 * 32) + 64 * h) + 6 * 64 * s  # projections; QK^T, AV halved
    mlp = 6 * h * 3 * 192
    per_token = layers * (attention + mlp) + 2 * 6 * (3 * h + 2 * h * h) + 3 * 6 * h * vocab
    assert flops_per_token(spec) == pytest.approx(per_token, rel=1e-12)
    assert per_token == 2_386_176  # 6 x 319,488 (layers) + 100,608 (MTP) + 368,640 (logits)


MOE_MLA = ["model.multi_latent_attention=true", "model.num_query_groups=null",
           "model.q_lora_rank=24", "model.kv_lora_rank=16", "model.qk_head_dim=12",
           "model.qk_pos_emb_head_dim=8", "model.v_head_dim=10", "model.num_moe_experts=8",
           "model.moe_router_topk=2", "model.moe_ffn_hidden_size=32",
           "model.moe_shared_expert_intermediate_size=48", "model.moe_layer_freq=[0,1,1,1]"]


@pytest.mark.parametrize("depths", [0, 2])
def test_moe_mla_by_hand(depths):
    """One dense then three MoE layers; the MTP layers are MoE, like the last decoder layer."""
    spec = load_spec(TINY, [*MOE_MLA, f"mtp.num_layers={depths}"])
    h, s, vocab, heads = 64, 64, 320, 4
    q = 24 * (h + heads * 20 + 1)  # q down, q norm, q up (nope 12 + rope 8)
    kv = 16 * (h + heads * (12 + 10) + 1) + h * 8  # kv down, kv norm, k/v up; shared rope key
    out = heads * 10 * h
    attention = 6 * (q + kv + out) + 6 * (heads * 20 / 2 + heads * 10 / 2) * s
    dense_mlp = 6 * h * 3 * 192
    moe_mlp = 6 * h * 3 * (2 * 32 + 48)  # top-2 routed experts of 32 plus the shared 48
    layers = 4 + depths
    per_token = (layers * attention + dense_mlp + (3 + depths) * moe_mlp
                 + depths * 6 * (3 * h + 2 * h * h) + (1 + depths) * 6 * h * vocab)
    assert flops_per_token(spec) == pytest.approx(per_token, rel=1e-12)


def test_packed_documents_count_attention_within_documents():
    spec = load_spec(TINY, ["mtp.num_layers=0"])
    lengths = [10, 20, 34]
    whole = num_floating_point_operations(spec, 1)
    packed = num_floating_point_operations(spec, 1, seqlen_squared_sum=sum(n * n for n in lengths),
                                           total_tokens=64)
    core_per_square = 6 * 64 * 4  # 4 layers of 64 query channels
    assert whole - packed == pytest.approx(core_per_square * (64**2 - sum(n * n for n in lengths)))
