"""The expert-parallel end-to-end runs (`mtp train` of the tiny MoE spec) and their
comparison, shared by the expert-parallel, expert FSDP2 and MoE context-parallel tests."""

from __future__ import annotations

import functools
from pathlib import Path

from tests.cli_helpers import SPECS, run_mtp
from tests.train_helpers import assert_same_training

STEPS = 5
EP_OVERRIDES = [
    "model.num_layers=2", "model.moe_layer_freq=[0, 1]", "model.seq_length=32",
    "model.moe_z_loss_coeff=1.0e-3", f"train.steps={STEPS}", "train.micro_batch_size=2",
    "model.layernorm_epsilon=1.0e-6",  # DeepSeek-V3's: the EP2 checkpoint exports
    "train.global_batch_size=8", "train.warmup_steps=1", "train.eval_interval=0",
    "train.log_interval=1", "checkpoint.interval=3", "checkpoint.keep_last=2",
    "logging.tensorboard=false",
]
EP_KEYS = ("lm_loss", "mtp_1_loss", "mtp_2_loss", "seq_load_balancing_loss", "z_loss",
           "load_imbalance")
assert_same_ep_run = functools.partial(assert_same_training, keys=EP_KEYS, steps=STEPS)


def train_ep(run_dir: Path, nproc: int, expert: int, *extra: str,
             spec: Path = SPECS / "tiny_moe.yaml") -> None:
    done = run_mtp("train", str(spec), *EP_OVERRIDES, *extra,
                   f"parallel.expert={expert}", "--run-dir", str(run_dir), "--nproc", str(nproc),
                   timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    if expert > 1:  # DDP skips the experts: no find_unused_parameters traversal (nor warning)
        assert "Warning" not in done.stderr, done.stderr[-3000:]


MLA_KEYS = ("multi_latent_attention", "q_lora_rank", "kv_lora_rank", "qk_head_dim",
            "qk_pos_emb_head_dim", "v_head_dim")


# an MoE model with shared experts and no aux loss: the dispatcher tests' model
DISPATCH_SPEC = {
    "model": {"vocab_size": 64, "hidden_size": 16, "num_layers": 2, "num_attention_heads": 2,
              "ffn_hidden_size": 32, "seq_length": 8, "normalization": "RMSNorm",
              "activation": "swiglu", "position_embedding": "rope", "add_bias_linear": False,
              "num_moe_experts": 4, "moe_router_topk": 2, "moe_ffn_hidden_size": 8,
              "moe_shared_expert_intermediate_size": 8, "moe_layer_freq": [0, 1],
              "moe_router_load_balancing_type": "none"},
}
