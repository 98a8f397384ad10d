"""Data parallel: DDP, or FSDP2 (`fully_shard`) with `parallel.fsdp: true`.

Both run over the 1-D data x context mesh and average gradients over it. FSDP2 (`shard_fully`)
also shards pipeline stages and tensor-parallel models (whose parameters are plain, locally
sliced tensors): the engine applies it to each stage after tensor parallel and recomputation,
as torchtitan composes them.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from mtp_cli.parallel.mesh import ParallelMesh


def apply_data_parallel(model: nn.Module, mesh: ParallelMesh, *, fsdp: bool,
                        device: torch.device) -> nn.Module:
    """Wrap (DDP) or shard in place (FSDP2) `model` for data parallel; returns the module to
    call for training. FSDP2 shards every decoder and MTP layer, then the rest (embedding,
    final norm, output layer) at the root, so a layer's weights are gathered only while it runs.
    """
    if fsdp:
        return shard_fully(model, mesh.dp_cp_mesh)
    device_ids = [device.index] if device.type == "cuda" else None
    # The only buffers (rotary frequencies) are constants: no broadcast before every forward.
    no_buffer_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        else {"broadcast_buffers": False}  # torch < 2.13
    )
    # A routed expert that no token of a micro-batch chose gets no gradient in it (under expert
    # parallel DDP skips the experts: `parallel.expert_parallel` reduces their gradients).
    ignored = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    has_experts = any(".local_experts." in name and name not in ignored
                      for name, _ in model.named_parameters())
    return DistributedDataParallel(model, device_ids=device_ids, process_group=mesh.dp_cp_group,
                                   find_unused_parameters=has_experts, **no_buffer_sync)


def shard_fully(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """FSDP2 over `mesh` (1-D, data x context): each decoder and MTP layer its own unit, then
    the rest (embedding, final norm, output layer) at the root. Works on a whole model or a
    pipeline stage, with tensor-parallel (plain, locally sliced) parameters inside."""
    for layer in _shardable_layers(model):
        fully_shard(layer, mesh=mesh)
    model.register_forward_hook(_own_output)  # runs before FSDP2's own post-forward hook
    fully_shard(model, mesh=mesh)
    return model


def _own_output(module: nn.Module, args: object, output: object) -> object:
    """The root's output as a tensor of its own, not a view.

    FSDP2 hangs its pre-backward hook on the root's output and warns, on every rank, when that
    is a view (an in-place op on it would drop the hook). The per-token loss is a transposed
    view of the flat cross-entropy; a copy of `b x s` floats costs nothing next to the step.
    """
    if isinstance(output, torch.Tensor) and output._base is not None:
        return output.clone(memory_format=torch.contiguous_format)
    return output


def _shardable_layers(model: nn.Module) -> list[nn.Module]:
    """Decoder layers and MTP layers, each its own FSDP2 unit. A repeated MTP layer (applied
    at every depth in one forward) stays with the root instead of being gathered D times."""
    decoder = getattr(model, "decoder", None)
    layers = list(decoder.layers.values()) if decoder is not None else []
    mtp = getattr(model, "mtp", None)
    if mtp is not None and not getattr(mtp, "use_repeated_layer", False):
        layers.extend(mtp.layers.values())
    return layers


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Synchronise gradients in this backward only when `enabled` (the last micro-batch)."""
    if isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
        return
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
    yield
