"""Tiny models and batches shared by the in-process step tests."""

from __future__ import annotations

import torch

from mtp_cli.data import Batch
from mtp_cli.data.batch import plain_batch

OVERRIDES = ["model.num_layers=1", "model.hidden_size=32", "model.seq_length=16",
             "model.ffn_hidden_size=64", "mtp.num_layers=2", "mtp.loss_scaling_factor=1.0"]


def batch(tokens: torch.Tensor) -> Batch:
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    positions = torch.arange(inputs.shape[1]).expand_as(inputs).contiguous()
    return Batch(input_ids=inputs, labels=labels, loss_mask=torch.ones_like(inputs,
                 dtype=torch.float32), position_ids=positions, packed_seq_params=None)


# an MoE model (sigmoid router, expert bias, aux loss) with one MTP depth
MOE_STEP_SPEC = {
    "model": {"vocab_size": 64, "hidden_size": 16, "num_layers": 2, "num_attention_heads": 2,
              "ffn_hidden_size": 32, "seq_length": 8, "normalization": "RMSNorm",
              "activation": "swiglu", "position_embedding": "rope", "add_bias_linear": False,
              "num_moe_experts": 4, "moe_router_topk": 2, "moe_ffn_hidden_size": 8,
              "moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True,
              "moe_router_bias_update_rate": 0.01, "moe_layer_freq": [0, 1],
              "moe_router_load_balancing_type": "aux_loss", "moe_aux_loss_coeff": 0.01},
    "mtp": {"num_layers": 1},
    "train": {"micro_batch_size": 2, "global_batch_size": 6, "grad_clip": 0.0},
}


def moe_batches(count: int) -> list:
    generator = torch.Generator().manual_seed(0)
    return [plain_batch(torch.randint(0, 64, (2, 9), generator=generator))
            for _ in range(count)]
