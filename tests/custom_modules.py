"""A module outside mtp-cli's registry, for `import:` specs (needs --allow-imports)."""

from __future__ import annotations

from torch import nn


class PlainLayerNorm(nn.LayerNorm):
    """A LayerNorm built from (config, hidden_size), as the backend.layer_norm slot is."""

    def __init__(self, config, hidden_size: int) -> None:
        super().__init__(hidden_size, eps=config.layernorm_epsilon)
