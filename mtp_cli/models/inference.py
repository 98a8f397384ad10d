"""The seam through which decoding reaches attention: an optional `inference_context`.

Training never passes one, so its forward is unchanged. During decoding, `GPTModel`,
`TransformerBlock`, `TransformerLayer` and the MTP layer hand the context down to each attention
module, which computes its keys and values for the new positions only, gives them to the
context, and attends over what the context returns: every cached position plus the new ones,
with the mask the context builds (True = masked, Megatron's polarity). The cache itself lives in
`mtp_cli.generate.kv_cache`; the model only knows this protocol.

Multi-latent attention caches its compressed latent instead (`update_latent`) and decodes with
its up-projections absorbed (`mtp_cli.models.mla`); `expanded_mla` asks it for the per-head keys
and values through `update_kv`, the reference path of the tests and benchmark.
"""

from __future__ import annotations

from typing import Protocol

import torch


class InferenceContext(Protocol):
    """A KV cache, as attention sees it."""

    expanded_mla: bool

    def update_kv(self, layer_number: int, key: torch.Tensor, value: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store `[s, b, groups, d]` keys/values of the new positions for layer `layer_number`;
        return `(keys, values, mask)`: `[S, b, groups, d]` over all cached slots and the
        `[b, 1, s, S]` boolean mask (True = masked) of the new queries against them."""
        ...

    def update_latent(self, layer_number: int, latent: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store MLA's `[s, b, d]` per-token latent of the new positions; return `(latents,
        mask)`: `[S, b, d]` over all cached slots and the mask, as `update_kv`."""
        ...
