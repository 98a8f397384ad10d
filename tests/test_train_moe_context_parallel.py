"""MoE and MLA under context and sequence parallel, end to end (gloo, real processes).

Each layout trains the same tiny model from the same seed and global batches for 5 steps and
must give, step by step, the single-process run's lm loss, each MTP depth's loss, the aux losses
and the load imbalance, and the same final parameters (expert biases included), to 1e-5:

- EP2 x CP2 (four processes: context 2, data 2, the expert group carved from data x context)
  on `specs/tiny_moe.yaml` shrunk: MLA (query/key heads nope + rope wide, value heads narrower)
  with YaRN active (scaling factor 4, `mscale` != `mscale_all_dim`, a sequence longer than
  `original_max_position_embeddings`), MoE with the sequence-wise balancing loss, the z-loss and
  the expert bias, two MoE MTP depths. Each rank holds zigzag chunks of its sequences: the
  router sums its token counts over the context ranks (Megatron's `tp_cp_group`), RoPE and YaRN
  take the global positions, the all-to-all crosses context ranks, and the bias update sums the
  counts over tensor x data x context ranks;
- TP2 x CP2 with sequence parallel (four processes) on a GQA + MoE model with the plain
  `aux_loss`, in per-token loss mode: each tensor rank routes its slice of its context chunks,
  the counts summed over the flattened context x tensor group, and each aux loss's gradient
  multiplied by its rank's tokens times that group's size (Megatron-Core's rule).

Every case uses Adam's eps 1e-6 and lr 1e-3 and the TP case turns off the QK norms, as the
expert-parallel TP test does: context and tensor parallel reorder sums (~1e-7 relative; the losses
agree to that), which Adam's first steps turn into visible differences for near-zero gradient
elements (with lr 3e-3 and eps 1e-8 a few MLA projection elements drift by up to 1e-4).
"""

from __future__ import annotations

import functools

import pytest
import yaml

from tests.cli_helpers import SPECS
from tests.expert_helpers import MLA_KEYS, STEPS, train_ep
from tests.train_helpers import assert_same_training, metrics

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

# two micro-batches of 2 sequences per step: at EP2 x CP2 (data 2) one per data-parallel rank
LEAN = ["train.global_batch_size=4"]
YARN = ["model.rope_type=yarn", "model.rotary_scaling_factor=4.0",
        "model.original_max_position_embeddings=16", "model.mscale=1.0",
        "model.mscale_all_dim=0.5", "train.adam_eps=1e-6", "train.lr=1e-3"]
SEQ_AUX_KEYS = ("lm_loss", "mtp_1_loss", "mtp_2_loss", "seq_load_balancing_loss", "z_loss",
                "load_imbalance")
AUX_KEYS = ("lm_loss", "mtp_1_loss", "mtp_2_loss", "load_balancing_loss", "z_loss",
            "load_imbalance")
_assert_same_run = functools.partial(assert_same_training, keys=SEQ_AUX_KEYS, steps=STEPS)
TP_SAFE = ["model.qk_layernorm=false", "model.num_query_groups=2", "train.adam_eps=1e-6",
           "train.lr=1e-3"]


def test_ep2_cp2_mla_moe_gives_the_single_process_run(tmp_path):
    train_ep(tmp_path / "single", 1, 1, *LEAN, *YARN)
    train_ep(tmp_path / "ep2cp2", 4, 2, *LEAN, *YARN, "parallel.context=2")
    _assert_same_run(tmp_path / "single", tmp_path / "ep2cp2")
    first = metrics(tmp_path / "ep2cp2")[0][0]
    assert first["seq_load_balancing_loss"] > 0 and first["z_loss"] > 0


def test_tp2_cp2_sequence_parallel_moe_gives_the_single_process_run(tmp_path):
    source = yaml.safe_load((SPECS / "tiny_moe.yaml").read_text())
    for key in MLA_KEYS:
        source["model"].pop(key)
    source["model"]["moe_router_load_balancing_type"] = "aux_loss"
    spec = tmp_path / "gqa_moe.yaml"
    spec.write_text(yaml.safe_dump(source))
    per_token = "train.calculate_per_token_loss=true"
    train_ep(tmp_path / "single", 1, 1, *LEAN, *TP_SAFE, per_token, spec=spec)
    train_ep(tmp_path / "tp2cp2sp", 4, 1, *LEAN, *TP_SAFE, per_token, "parallel.tensor=2",
           "parallel.context=2", "parallel.sequence_parallel=true", spec=spec)
    _assert_same_run(tmp_path / "single", tmp_path / "tp2cp2sp", keys=AUX_KEYS)
