"""Shared bits of the inspect tests: the Megatron-Core reference state dict and an in-process CLI.

The reference weights (`tests/data/megatron_core_tiny_mtp2.pt`, see README_reference_case.md) are Megatron-Core 0.19.2's own
tiny GPT with two MTP depths; its JSON gives the configuration and the parameter count, so the
tests check our reading against numbers Megatron produced, not against our own code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from typer.testing import CliRunner

from mtp_cli.cli import app

DATA = Path(__file__).resolve().parent / "data"
REFERENCE_PT = DATA / "megatron_core_tiny_mtp2.pt"
REFERENCE_JSON = DATA / "megatron_core_tiny_mtp2.json"


def reference_config() -> dict[str, Any]:
    return json.loads(REFERENCE_JSON.read_text())


def reference_state_dict() -> dict[str, torch.Tensor]:
    """A fresh copy of the reference model's state dict (`mtp_model_layer` spelling)."""
    loaded = torch.load(REFERENCE_PT, weights_only=True)
    return {name: tensor.clone() for name, tensor in loaded["state_dict"].items()}


def save_state_dict(path: Path, state: dict[str, Any]) -> Path:
    torch.save(state, path)
    return path


def reference_spec_yaml(path: Path) -> Path:
    """A spec file with the reference configuration (Megatron defaults otherwise)."""
    c = reference_config()["config"]
    path.write_text(
        "model:\n"
        f"  vocab_size: {c['vocab_size']}\n  hidden_size: {c['hidden_size']}\n"
        f"  num_layers: {c['num_layers']}\n  num_attention_heads: {c['num_attention_heads']}\n"
        f"  ffn_hidden_size: {c['ffn_hidden_size']}\n  seq_length: {c['seq_len']}\n"
        f"  normalization: {c['normalization']}\n"
        f"  position_embedding: {c['position_embedding_type']}\n"
        f"mtp:\n  num_layers: {c['mtp_num_layers']}\n"
    )
    return path


def invoke(*args: str):
    """Run `mtp ARGS` in this process (the real typer app): result has exit_code/stdout/stderr."""
    return CliRunner().invoke(app, [str(a) for a in args])


def invoke_json(*args: str) -> tuple[int, dict[str, Any]]:
    result = invoke(*args, "--json")
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.stdout)


def check(payload: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in payload["checks"] if c["name"] == name]
    assert len(found) == 1, payload["checks"]
    return found[0]
