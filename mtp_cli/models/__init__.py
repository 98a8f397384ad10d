"""Plain PyTorch modules. Importing this package registers them for ModuleSpecs."""

from mtp_cli.models import (
    attention,
    embedding,
    linear,
    mla,
    mlp,
    norms,
    te,
    transformer_layer,
)
from mtp_cli.models.gpt import GPTModel
from mtp_cli.models.moe import experts, layer, router, shared_experts

__all__ = [
    "GPTModel",
    "attention",
    "embedding",
    "experts",
    "layer",
    "linear",
    "mla",
    "mlp",
    "norms",
    "router",
    "shared_experts",
    "te",
    "transformer_layer",
]
