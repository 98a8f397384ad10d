"""Backend providers: which class fills each `backend.*` slot of a ModuleSpec.

`LocalSpecProvider` answers with plain PyTorch modules, `TESpecProvider` with Transformer
Engine's (imported only when a TE model is built). They sit with the modules they name, below the
MTP package (as in Megatron-Core, `megatron.core.models.backends`), so that the MTP layer's spec
(`get_mtp_layer_spec`) and the default module trees of `mtp_cli.builders` both read them.
"""

from __future__ import annotations

from typing import Any, Protocol

from mtp_cli.nn.module_spec import MODULE_REGISTRY


class BackendSpecProvider(Protocol):
    name: str

    def layer_norm(self) -> Any: ...
    def column_parallel_linear(self) -> Any: ...
    def row_parallel_linear(self) -> Any: ...
    def core_attention(self) -> Any: ...


class LocalSpecProvider:
    """Plain PyTorch: torch norms, `ColumnParallelLinear` / `RowParallelLinear`, SDPA."""

    name = "local"

    def layer_norm(self) -> Any:
        return MODULE_REGISTRY["WrappedTorchNorm"].factory

    def column_parallel_linear(self) -> Any:
        return MODULE_REGISTRY["ColumnParallelLinear"].factory

    def row_parallel_linear(self) -> Any:
        return MODULE_REGISTRY["RowParallelLinear"].factory

    def core_attention(self) -> Any:
        return MODULE_REGISTRY["DotProductAttention"].factory


class TESpecProvider:
    """Transformer Engine: `TENorm`, `TEColumnParallelLinear`, `TERowParallelLinear`, ..."""

    name = "te"

    def __init__(self) -> None:
        from mtp_cli.models.te import import_transformer_engine

        import_transformer_engine()  # fail early, with the install hint

    def layer_norm(self) -> Any:
        return MODULE_REGISTRY["TENorm"].factory

    def column_parallel_linear(self) -> Any:
        return MODULE_REGISTRY["TEColumnParallelLinear"].factory

    def row_parallel_linear(self) -> Any:
        return MODULE_REGISTRY["TERowParallelLinear"].factory

    def core_attention(self) -> Any:
        return MODULE_REGISTRY["TEDotProductAttention"].factory


def backend_provider(name: str) -> BackendSpecProvider:
    """The provider for `model.backend`."""
    return TESpecProvider() if name == "te" else LocalSpecProvider()
