"""`train.compile`: each transformer layer compiled on its own, applied to a built model from
outside (torchtitan's per-block `torch.compile`).

The units are the decoder layers and each MTP layer's transformer layer: every one is a
`TransformerLayer` of the same shape, so one compiled graph serves them all (a layer's weights
are its graph's inputs), and compiling a block rather than the whole model keeps compile time
to one layer's and leaves the model's Python (losses, MTP rolling, pipeline stages) eager.
`nn.Module.compile` compiles in place: module names, state-dict keys and parameters do not
change, and checkpoints load either way. Graph breaks: none inside a dense or MLA layer; an MoE
layer's dispatch (`nonzero` and the per-expert counts as Python ints) is data-dependent and
breaks there, the experts and the combine being compiled again after it. Dynamic sizes (tokens
per expert) are marked dynamic after their first change, so steps do not recompile per count.

Apply after tensor and context parallel and recomputation, before data parallel, as torchtitan
orders them. Under `recompute: full` the layer's body is compiled and the checkpoint stays eager
around it (its `context_fn` mutes the MoE metrics during the recomputation, which dynamo does not
take), MoE layers excepted (they stay eager there: `_has_moe`); under `selective` the attention core's checkpoint is traced inside the compiled layer. Off by default: on the 2-core CPU
the compiled layers were slower than eager (README, "Compiled layers").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mtp_cli.gpt import GPTModel
from mtp_cli.models.moe.grouped_gemm import grouped_mm_available
from mtp_cli.models.moe.layer import MoELayer
from mtp_cli.parallel.recompute import is_checkpointed

# The most graphs one compiled layer may hold before dynamo falls back to eager for it. A
# dense layer needs 1-2 (static, then dynamic shapes), an MoE layer a few per graph piece.
RECOMPILE_LIMIT = 16


def compiled_units(model: GPTModel) -> list[nn.Module]:
    """The modules `train.compile` compiles: decoder layers, then MTP transformer layers."""
    units: list[nn.Module] = []
    decoder = getattr(model, "decoder", None)
    if decoder is not None:
        units.extend(decoder.layers.values())
    for layer in model.mtp_layers():
        units.append(layer.transformer_layer)
    return units


def apply_compile(model: GPTModel, enabled: bool) -> list[nn.Module]:
    """Compile each unit of `model` in place when `enabled`; returns the compiled units."""
    if not enabled:
        return []
    dynamo_config = torch._dynamo.config
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    # one MoE layer's graphs serve every layer: several layers, each a few graphs
    dynamo_config.accumulated_recompile_limit = max(
        dynamo_config.accumulated_recompile_limit, 8 * RECOMPILE_LIMIT)
    units = compiled_units(model)
    for param in model.parameters():  # probed eagerly: compiled code reads the answer only
        grouped_mm_available(param.device, torch.bfloat16)
        break
    options = {"pattern_matcher": False} if _mla(model) else None
    compiled_forwards: dict[type, Any] = {}
    recomputed_mtp = {id(layer.transformer_layer) for layer in model.mtp_layers()
                      if getattr(layer, "recompute_granularity", None) == "full"}
    compiled: list[nn.Module] = []
    for unit in units:
        if (is_checkpointed(unit) or id(unit) in recomputed_mtp) and _has_moe(unit):
            continue  # stays eager: see `_has_moe`
        compiled.append(unit)
        if is_checkpointed(unit):  # recompute full: checkpoint (eager) around the compiled body
            kind = type(unit)
            if kind not in compiled_forwards:
                compiled_forwards[kind] = torch.compile(kind.forward, options=options)
            unit.compiled_forward = compiled_forwards[kind]
        else:
            unit.compile(options=options)
    return compiled


def _has_moe(unit: nn.Module) -> bool:
    """Whether `unit` holds an MoE layer. Under `recompute: full` such a layer stays eager: its
    recomputation can pick another compiled graph than its forward ran (the routed counts make
    the post-dispatch graph go from static to dynamic), and the checkpoint then refuses the
    differing saved tensors (torch 2.13; measured here, not worked around yet)."""
    return any(isinstance(module, MoELayer) for module in unit.modules())


def _mla(model: GPTModel) -> bool:
    """Whether `model` has multi-latent attention, whose SDPA (query width != value width, so
    CPU takes the math path) trips inductor's attention-fusion pattern in torch 2.13 (a
    broadcast error while matching `_sfdp_pattern_29`): there the pattern matcher stays off."""
    config = getattr(model, "config", None)
    return bool(getattr(config, "multi_latent_attention", False))
