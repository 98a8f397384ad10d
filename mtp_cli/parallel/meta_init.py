"""Build a rank's stage with its parameters on the meta device, then materialise its shards.

A training engine must not build a whole stage on the device before slicing it for tensor
parallel: a 70B stage does not fit. Under `parameters_on_meta()` every parameter a module
registers goes to the meta device as soon as it is created (one tensor's allocation at a time,
released at once), while buffers (rotary frequencies, MoE routers' counters) are computed on the
real device as usual. Tensor parallel then reshapes the meta parameters to this rank's local
shapes, and `materialize` allocates only those, initialised by global parameter name from
`train.seed` (`mtp_cli.builders.init`): each parameter's full initial value is drawn, sliced with the
plan's `shard_fn` and dropped before the next, so at most one full tensor exists at a time and
every layout starts from exactly the single-process weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from mtp_cli.builders.init import ShardFn, initialize_parameters
from mtp_cli.config.schema import RunSpec


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every `nn.Module.register_parameter` within puts the parameter on the meta device."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            meta = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
            meta.__dict__.update(param.__dict__)
            param = meta
        original(module, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def materialize(model: nn.Module, spec: RunSpec, device: torch.device, *,
                shard_fn: ShardFn | None = None,
                full_shapes: dict[str, torch.Size] | None = None) -> None:
    """Allocate `model`'s meta parameters on `device` (their current, local shapes; a shared
    parameter stays shared) and initialise them by global name, sliced by `shard_fn`."""
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or param.device.type != "meta":
                continue
            if id(param) not in made:
                real = nn.Parameter(torch.empty_like(param, device=device),
                                    requires_grad=param.requires_grad)
                real.__dict__.update(param.__dict__)
                made[id(param)] = real
            module._parameters[name] = made[id(param)]
    initialize_parameters(model, spec, shard_fn=shard_fn, full_shapes=full_shapes)
