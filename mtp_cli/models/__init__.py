"""Plain PyTorch modules. Importing this package registers them for ModuleSpecs.

The MTP package (`mtp_cli.mtp`) is built from these pieces, and the GPT model that joins the
decoder and the MTP block sits above both (`mtp_cli.gpt`).
"""

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
from mtp_cli.models.moe import experts, layer, router, shared_experts

__all__ = [
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

