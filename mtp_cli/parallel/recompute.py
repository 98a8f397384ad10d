"""Activation recomputation (`train.recompute`), applied to a built model from outside.

* `full`: each decoder layer keeps only its input; backward runs the layer's forward again. Each
  MTP layer does the same through its own `_checkpointed_forward` (Megatron-Core's path: the
  norms, `eh_proj`, the transformer layer and the final norm recomputed together).
* `selective`: only the attention core (softmax(QK^T)V, whose activations grow with s^2 per head)
  is recomputed, in the decoder and MTP layers alike - Megatron's "selective" granularity.

torch.utils.checkpoint, non-reentrant: the RNG state (dropout) and autocast are replayed, so
losses and gradients are those of `none`. As torchtitan does, the model's code is untouched: a
module's `forward` is replaced on the instance by a method that checkpoints the class's forward
(names, state-dict keys and parameters unchanged; a deep copy re-binds to the copy). Apply after
tensor and context parallel (their collectives are recomputed with the layer) and before data
parallel.
"""

from __future__ import annotations

import functools
import types
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mtp_cli.gpt import GPTModel
from mtp_cli.models.moe.aux_losses import recompute_contexts

RecomputeMode = Literal["none", "full", "selective"]
RECOMPUTE_MODES: tuple[str, ...] = ("none", "full", "selective")


def _recomputed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The class's forward (compiled when `train.compile` set `compiled_forward`, a function of
    the module), checkpointed while training with autograd on."""
    compiled = self.__dict__.get("compiled_forward")
    forward = (functools.partial(compiled, self) if compiled is not None
               else type(self).forward.__get__(self))
    if self.training and torch.is_grad_enabled():
        if torch.compiler.is_compiling():  # an attention core inside a compiled layer: dynamo
            # takes no custom context_fn, and the core records no MoE metrics to mute
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False,
                          context_fn=functools.partial(recompute_contexts, self), **kwargs)
    return forward(*args, **kwargs)


def checkpoint_module(module: nn.Module) -> None:
    """Recompute `module`'s forward in backward (in place; once)."""
    if is_checkpointed(module):
        raise ValueError(f"{type(module).__name__} is already recomputed")
    module.forward = types.MethodType(_recomputed_forward, module)


def is_checkpointed(module: nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return isinstance(forward, types.MethodType) and forward.__func__ is _recomputed_forward


def attention_cores(model: nn.Module) -> list[nn.Module]:
    """Every attention's `core_attention` module (decoder and MTP layers)."""
    return [module.core_attention for module in model.modules()
            if isinstance(getattr(module, "core_attention", None), nn.Module)]


def apply_activation_checkpointing(model: GPTModel, mode: RecomputeMode) -> None:
    """Recompute `model`'s activations in backward as `mode` says (`none`: leave it)."""
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"train.recompute must be one of {RECOMPUTE_MODES}, got {mode!r}")
    if mode == "full":
        for layer in model.decoder.layers.values():
            checkpoint_module(layer)
        for layer in model.mtp_layers():
            layer.recompute_granularity = "full"
    elif mode == "selective":
        for core in attention_cores(model):
            checkpoint_module(core)
