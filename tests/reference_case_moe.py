"""The Megatron-Core 0.19.2 MoE reference case (tests/data, copied from shared/reference_case_moe)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

DATA = Path(__file__).resolve().parent / "data"
CASE_PT = DATA / "megatron_core_tiny_moe_mtp2.pt"
CASE_JSON = DATA / "megatron_core_tiny_moe_mtp2.json"
# Megatron TransformerConfig fields that choose kernels or dispatchers, not the mathematics
IMPLEMENTATION_ONLY = ("moe_token_dispatcher_type", "moe_grouped_gemm", "moe_router_dtype")


def load_case() -> dict[str, Any]:
    return torch.load(CASE_PT, weights_only=True)


def case_summary() -> dict[str, Any]:
    return json.loads(CASE_JSON.read_text())


def case_spec_mapping(**model_overrides: Any) -> dict[str, Any]:
    """The reference configuration as a run spec mapping (Megatron's moe_* names unchanged)."""
    summary = case_summary()
    config = summary["config"]
    model = {k: v for k, v in config.items()
             if (k.startswith("moe_") or k == "num_moe_experts") and k not in IMPLEMENTATION_ONLY}
    model.update(
        vocab_size=summary["vocab_size"], seq_length=summary["seq_length"],
        hidden_size=config["hidden_size"], num_layers=config["num_layers"],
        num_attention_heads=config["num_attention_heads"],
        num_query_groups=config["num_query_groups"], ffn_hidden_size=config["ffn_hidden_size"],
        normalization=config["normalization"], add_bias_linear=config["add_bias_linear"],
        activation=summary["activation"], position_embedding=summary["position_embedding"],
        share_embeddings_and_output_weights=summary["tied"],
    )
    model.update(model_overrides)
    return {"model": model, "mtp": {"num_layers": config["mtp_num_layers"],
                                    "loss_scaling_factor": config["mtp_loss_scaling_factor"]}}
