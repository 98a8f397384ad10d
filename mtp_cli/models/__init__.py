"""Plain PyTorch modules. Importing this package registers them for ModuleSpecs."""

from mtp_cli.models import attention, embedding, linear, mlp, norms, te, transformer_layer
from mtp_cli.models.gpt import GPTModel

__all__ = [
    "GPTModel",
    "attention",
    "embedding",
    "linear",
    "mlp",
    "norms",
    "te",
    "transformer_layer",
]
