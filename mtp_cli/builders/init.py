"""Parameter initialisation that does not depend on how the model is split.

Every parameter is drawn from its own generator, seeded from `train.seed` and the parameter's
global name (`decoder.layers.12.mlp.linear_fc1.weight`), so that a stage of a pipeline, a
tensor-parallel shard or the single-process model all start from exactly the same weights.
Megatron-Core's rules: norms' scales 1 and biases 0; weights N(0, std), and N(0, std/sqrt(2N))
for the projections that feed the residual stream (`scaled_init`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import torch
from torch import nn

from mtp_cli.config.schema import RunSpec

TIED_OUTPUT_SOURCE = "embedding.word_embeddings.weight"

# (global name, full tensor) -> the part this rank holds; identity without tensor parallel.
ShardFn = Callable[[str, torch.Tensor], torch.Tensor]


def parameter_seed(seed: int, name: str) -> int:
    """A 63-bit seed from the run seed and the parameter's global name."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def full_initial_value(name: str, shape: torch.Size, *, std: float, scaled: bool,
                       num_layers: int, seed: int) -> torch.Tensor:
    """The fp32 initial value of one whole (unsharded) parameter."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        return torch.zeros(shape)
    if len(shape) == 1:  # norm scales
        return torch.ones(shape)
    if scaled:
        std = std / math.sqrt(2.0 * num_layers)
    generator = torch.Generator().manual_seed(parameter_seed(seed, name))
    return torch.randn(shape, generator=generator) * std


def initialize_parameters(model: nn.Module, spec: RunSpec, *, seed: int | None = None,
                          shard_fn: ShardFn | None = None,
                          full_shapes: dict[str, torch.Size] | None = None) -> None:
    """Initialise every parameter of `model` in place (skipped on the meta device)."""
    seed = spec.train.seed if seed is None else seed
    tied = spec.model.share_embeddings_and_output_weights
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if param.device.type == "meta":
                continue
            name = f"{module_name}.{param_name}" if module_name else param_name
            shape = full_shapes.get(name, param.shape) if full_shapes else param.shape
            # a pipeline loss stage's copy of a tied word embedding starts equal to it
            seed_name = TIED_OUTPUT_SOURCE if tied and name == "output_layer.weight" else name
            value = full_initial_value(
                seed_name, shape, std=spec.model.init_method_std,
                scaled=bool(getattr(module, "scaled_init", False)),
                num_layers=spec.model.num_layers, seed=seed,
            )
            if shard_fn is not None:
                value = shard_fn(name, value)
            with torch.no_grad():
                param.copy_(value.to(param.dtype))
            del value  # released before the next draw: one full tensor at a time
