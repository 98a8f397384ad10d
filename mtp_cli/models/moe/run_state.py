"""What a trainer does with a model's MoE routers: loss scale, expert-bias update, metrics.

All state lives on the routers of the model passed in (no globals), so these functions take the
model or its pipeline chunks:
- `set_moe_aux_loss_scale(chunks, scale, per_token=...)` before each micro-batch's backward, with
  the scale of the MTP losses (1 / micro-batches; 1 in per-token mode);
- `update_expert_bias(chunks, reduce_counts=...)` once after each optimizer step (Megatron-Core
  does it in `finalize_model_grads`): every router with `moe_router_enable_expert_bias` moves its
  bias by `rate * sign(mean count - count)`, outside autograd, then zeroes its counts.
  `reduce_counts` sums the `[routers, E]` counts over the data x context (x tensor) ranks that saw
  other tokens of the same step (the trainer passes an all-reduce; models never communicate);
- `moe_layer_metrics(chunks)` / `summarize_moe_metrics(...)`: the recorded losses per layer, and
  Megatron-Core's logged value: the sum over layers times the loss scale, divided by the number of
  MoE layers including the MTP layers; `clear_moe_metrics` afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from mtp_cli.models.moe.router import TopKRouter
from mtp_cli.models.moe.routing import updated_expert_bias

Chunks = nn.Module | Iterable[nn.Module]


def moe_routers(chunks: Chunks) -> list[TopKRouter]:
    """Every router of a model (or of its pipeline chunks), each once."""
    chunks = [chunks] if isinstance(chunks, nn.Module) else list(chunks)
    seen: dict[int, TopKRouter] = {}
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, TopKRouter):
                seen.setdefault(id(module), module)
    return list(seen.values())


def configure_moe_routers(model: nn.Module, *, mtp_repeats: int) -> None:
    """A repeated MTP layer runs at `mtp_repeats` depths: its balancing loss counts 1/repeats."""
    for router in moe_routers(model):
        router.mtp_repeats = mtp_repeats if router.is_mtp_layer else 1


def set_moe_aux_loss_scale(chunks: Chunks, scale: float | torch.Tensor, *,
                           per_token: bool = False) -> None:
    """The backward scale of every auxiliary loss (set before each micro-batch's backward)."""
    for router in moe_routers(chunks):
        router.aux_loss_scale.value = scale
        router.aux_loss_scale.per_token = per_token


@torch.no_grad()
def update_expert_bias(chunks: Chunks,
                       reduce_counts: Callable[[torch.Tensor], torch.Tensor] | None = None
                       ) -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing step for every router in training mode."""
    routers = []
    for router in moe_routers(chunks):
        if router.expert_bias is None or not router.training:
            continue
        if router.weight.requires_grad:
            routers.append(router)
        else:  # frozen (train.freeze): keeps its bias
            router.local_tokens_per_expert.zero_()
    if not routers:
        return
    counts = torch.stack([r.local_tokens_per_expert for r in routers])
    if reduce_counts is not None:
        counts = reduce_counts(counts)
    biases = torch.stack([r.expert_bias for r in routers])
    rate = routers[0].config.moe_router_bias_update_rate
    for router, bias in zip(routers, updated_expert_bias(counts, biases, rate), strict=True):
        router.expert_bias.copy_(bias)
        router.local_tokens_per_expert.zero_()


def moe_layer_metrics(chunks: Chunks) -> dict[int, dict[str, Any]]:
    """Per layer number: its recorded losses (summed over micro-batches) and `tokens_per_expert`."""
    out: dict[int, dict[str, Any]] = {}
    for router in moe_routers(chunks):
        entry = {name: float(value) for name, value in router.metrics.losses.items()}
        if router.metrics.tokens_per_expert is not None:
            entry["tokens_per_expert"] = router.metrics.tokens_per_expert.clone()
        out[router.layer_number] = entry
    return out


def summarize_moe_metrics(per_layer: dict[int, dict[str, Any]], num_moe_layers: int,
                          loss_scale: float) -> dict[str, float]:
    """Megatron-Core's logged values: `sum over layers x loss_scale / num_moe_layers` per loss,
    and `load_imbalance`: max over layers of (max tokens on an expert / mean per expert)."""
    totals: dict[str, float] = {}
    imbalance = 0.0
    for entry in per_layer.values():
        for name, value in entry.items():
            if name == "tokens_per_expert":
                mean = value.float().mean()
                if mean > 0:
                    imbalance = max(imbalance, float(value.max() / mean))
            else:
                totals[name] = totals.get(name, 0.0) + value
    summary = {name: value * loss_scale / num_moe_layers for name, value in totals.items()}
    if any("tokens_per_expert" in entry for entry in per_layer.values()):
        summary["load_imbalance"] = imbalance
    return summary


def clear_moe_metrics(chunks: Chunks) -> None:
    for router in moe_routers(chunks):
        router.metrics.clear()
