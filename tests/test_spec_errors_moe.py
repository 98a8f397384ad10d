"""Bad MoE / MLA input: exit 2, the file, line and key at fault, no traceback, nothing built."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtp_cli import load_spec
from mtp_cli.errors import SpecError
from tests.cli_helpers import run_mtp

MOE = """model:
  vocab_size: 64
  hidden_size: 32
  num_layers: 2
  num_attention_heads: 4
  seq_length: 8
  num_moe_experts: 8
  moe_router_topk: 2
"""
MLA = """model:
  vocab_size: 64
  hidden_size: 32
  num_layers: 2
  num_attention_heads: 4
  seq_length: 8
  position_embedding: rope
  multi_latent_attention: true
  kv_lora_rank: 16
  qk_head_dim: 8
  qk_pos_emb_head_dim: 8
  v_head_dim: 8
"""

# (name, spec text, fragments of the rendered message: line:column, key, explanation)
CASES = [
    ("topk_exceeds_experts", MOE.replace("moe_router_topk: 2", "moe_router_topk: 9"),
     [":8:3:", "model.moe_router_topk", "exceeds num_moe_experts (8)"]),
    ("groups_not_dividing_experts", MOE + "  moe_router_num_groups: 3\n",
     [":9:3:", "model.moe_router_num_groups", "must divide num_moe_experts (8)"]),
    ("group_topk_exceeds_groups",
     MOE + "  moe_router_num_groups: 2\n  moe_router_group_topk: 3\n",
     [":10:3:", "model.moe_router_group_topk", "exceeds moe_router_num_groups (2)"]),
    ("group_topk_without_groups", MOE + "  moe_router_group_topk: 1\n",
     [":9:3:", "model.moe_router_group_topk", "needs moe_router_num_groups"]),
    ("expert_parallel_not_dividing_experts", MOE + "parallel:\n  expert: 3\n",
     [":10:3:", "parallel.expert", "must divide model.num_moe_experts (8)"]),
    ("expert_parallel_without_moe", MOE.replace("  num_moe_experts: 8\n  moe_router_topk: 2\n",
                                                "") + "parallel:\n  expert: 2\n",
     [":8:3:", "parallel.expert", "no MoE"]),
    ("moe_key_without_experts", MOE.replace("  num_moe_experts: 8\n", "").replace(
        "moe_router_topk: 2", "moe_router_topk: 4"),
     [":7:3:", "model.moe_router_topk", "needs num_moe_experts"]),
    ("layer_freq_list_length", MOE + "  moe_layer_freq: [0, 1, 1]\n",
     [":9:3:", "model.moe_layer_freq", "lists 3 layers, num_layers is 2"]),
    ("layer_freq_not_bits", MOE + "  moe_layer_freq: [0, 2]\n",
     [":9:", "model.moe_layer_freq"]),
    ("mla_odd_rope_dim", MLA.replace("qk_pos_emb_head_dim: 8", "qk_pos_emb_head_dim: 7"),
     [":11:3:", "model.qk_pos_emb_head_dim", "even"]),
    ("mla_with_query_groups", MLA + "  num_query_groups: 2\n",
     [":13:3:", "model.num_query_groups", "one key/value head per query head"]),
    ("mla_with_kv_channels", MLA + "  kv_channels: 32\n",
     [":13:3:", "model.kv_channels", "qk_head_dim + qk_pos_emb_head_dim"]),
    ("mla_without_rope", MLA.replace("position_embedding: rope", "position_embedding: none"),
     [":7:3:", "model.position_embedding", "set position_embedding: rope"]),
    ("mla_partial_rope", MLA + "  rotary_percent: 0.5\n",
     [":13:3:", "model.rotary_percent", "leave rotary_percent at 1"]),
    ("mla_key_without_mla", MLA.replace("  multi_latent_attention: true\n", ""),
     [":8:3:", "model.kv_lora_rank", "set multi_latent_attention: true"]),
    ("yarn_betas", MLA + "  rope_type: yarn\n  beta_fast: 1\n  beta_slow: 2\n",
     [":14:3:", "model.beta_fast", "beta_fast (1.0) > beta_slow (2.0)"]),
    ("partial_rope_odd_channels", MOE + "  rotary_percent: 0.2\n  position_embedding: rope\n",
     [":9:3:", "model.rotary_percent", "8 x 0.2 gives 1"]),
]


@pytest.mark.parametrize("name,text,fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_moe_and_mla_input_names_the_line_and_key(tmp_path: Path, name, text, fragments):
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    with pytest.raises(SpecError) as raised:
        load_spec(spec)
    assert raised.value.exit_code == 2
    message = raised.value.render()
    assert str(spec) in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_the_command_line_exits_2_without_a_traceback(tmp_path: Path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(MOE.replace("moe_router_topk: 2", "moe_router_topk: 9"))
    result = run_mtp("build", str(spec), cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    assert f"{spec}:8:3: model.moe_router_topk: moe_router_topk (9) exceeds" in result.stderr
    assert list(tmp_path.iterdir()) == [spec]
