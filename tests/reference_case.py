"""The Megatron-Core 0.19.2 reference case (tests/data, copied from shared/reference_case)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

DATA = Path(__file__).resolve().parent / "data"
CASE_PT = DATA / "megatron_core_tiny_mtp2.pt"
CASE_JSON = DATA / "megatron_core_tiny_mtp2.json"


def load_case() -> dict[str, Any]:
    return torch.load(CASE_PT, weights_only=True)


def case_spec_mapping() -> dict[str, Any]:
    """The reference configuration as a run spec mapping."""
    config = json.loads(CASE_JSON.read_text())["config"]
    return {
        "model": {
            "vocab_size": config["vocab_size"],
            "hidden_size": config["hidden_size"],
            "num_layers": config["num_layers"],
            "num_attention_heads": config["num_attention_heads"],
            "ffn_hidden_size": config["ffn_hidden_size"],
            "seq_length": config["seq_len"],
            "normalization": config["normalization"],
            "activation": "swiglu" if config["gated_linear_unit"] else "gelu",
            "layernorm_epsilon": config["layernorm_epsilon"],
            "position_embedding": config["position_embedding_type"],
            "share_embeddings_and_output_weights": config["share_embeddings_and_output_weights"],
            "init_method_std": config["init_method_std"],
        },
        "mtp": {
            "num_layers": config["mtp_num_layers"],
            "loss_scaling_factor": config["mtp_loss_scaling_factor"],
        },
    }


def case_summary() -> dict[str, Any]:
    return json.loads(CASE_JSON.read_text())
