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

Apply after tensor and context parallel and recomputation (compile traces the checkpointed
forward) and before data parallel, as torchtitan orders them. Off by default: on the 2-core CPU
the compiled layers were slower than eager (README, "Compiled layers").
"""

from __future__ import annotations

import torch
from torch import nn

from mtp_cli.gpt import GPTModel
from mtp_cli.models.moe.grouped_gemm import grouped_mm_available

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
    for unit in units:
        unit.compile(options=options)
    return units


def _mla(model: GPTModel) -> bool:
    """Whether `model` has multi-latent attention, whose SDPA (query width != value width, so
    CPU takes the math path) trips inductor's attention-fusion pattern in torch 2.13 (a
    broadcast error while matching `_sfdp_pattern_29`): there the pattern matcher stays off."""
    config = getattr(model, "config", None)
    return bool(getattr(config, "multi_latent_attention", False))
