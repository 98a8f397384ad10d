"""Plain PyTorch modules. Importing this package registers them for ModuleSpecs.

`GPTModel` is imported on first use: it stands on the MTP package (`mtp_cli.mtp`), which itself
uses this package's single-device pieces (`comm`), so importing it here would close a cycle.
"""

from typing import Any

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


def __getattr__(name: str) -> Any:
    if name == "GPTModel":
        from mtp_cli.models.gpt import GPTModel

        return GPTModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
