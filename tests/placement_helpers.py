"""Small specs for the placement tests: a tiny model whose layer counts and parallel set-up vary."""

from __future__ import annotations

from typing import Any

from mtp_cli import load_spec
from mtp_cli.config.schema import RunSpec

TINY_MODEL = {
    "vocab_size": 64, "hidden_size": 16, "num_attention_heads": 2, "seq_length": 8,
    "normalization": "RMSNorm", "activation": "swiglu", "position_embedding": "rope",
    "add_bias_linear": False,
}


def make_spec(num_layers: int, depths: int, pipeline: int = 1, layout: str | None = None,
              model: dict[str, Any] | None = None, **parallel: Any) -> RunSpec:
    """A validated spec (through `load_spec`, as users get it)."""
    return load_spec({
        "model": {**TINY_MODEL, "num_layers": num_layers, **(model or {})},
        "mtp": {"num_layers": depths},
        "parallel": {"pipeline": pipeline, "layout": layout, **parallel},
    })
