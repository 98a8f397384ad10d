"""Plain PyTorch modules. Importing this package registers them for ModuleSpecs."""

from mtp_cli.models import attention, embedding, linear, mlp, norms, te, transformer_layer
from mtp_cli.models.gpt import GPTModel, StageContents

__all__ = [
    "GPTModel",
    "StageContents",
    "attention",
    "embedding",
    "linear",
    "mlp",
    "norms",
    "te",
    "transformer_layer",
]
