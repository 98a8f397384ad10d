"""`SequentialMLP`: the routed experts, one MLP each, keyed by their GLOBAL expert index.

Stored layout (Megatron-Core's SequentialMLP names): `experts.local_experts.{e}.linear_fc1.weight`
`[2 x moe_ffn, h]` (`[gate; up]` with SwiGLU) and `...linear_fc2.weight` `[h, moe_ffn]`, one tensor
per expert, `e` the global index. A rank of an expert-parallel group builds only its experts but
names them globally, so checkpoints reshard by name to any expert-parallel size and an expert
missing from a checkpoint is named by its index.

The computation is one grouped GEMM per projection over all the experts (`grouped_gemm.py`:
`torch._grouped_mm` on the experts' weights stacked at call time, the stored tensors untouched)
where it runs for the device, dtype and sizes, and the experts' linears are plain
(`plain_linear`: `x @ W^T + b`; Transformer Engine's are not); otherwise the per-expert loop.
Both give the same numbers (tests/test_grouped_experts.py); the default (`grouped_gemm = None`:
grouped where available) is chosen by `benchmarks/expert_gemm.py`, figures in grouped_gemm.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtp_cli.config.schema import ModelConfig
from mtp_cli.models.mlp import MLP, MLPSubmodules
from mtp_cli.models.moe.grouped_gemm import (
    aligned,
    contiguous_grad,
    group_offsets,
    grouped_linear,
    grouped_mm_available,
)
from mtp_cli.nn.module_spec import register_module


@dataclass
class ExpertsSubmodules:
    linear_fc1: Any = None
    linear_fc2: Any = None


@register_module(submodules=ExpertsSubmodules)
class SequentialMLP(nn.Module):
    """The experts `expert_indices` of one MoE layer: one grouped GEMM per projection, or one
    expert after another (see the module). `grouped_gemm`: None picks by availability, False
    forces the loop, True the grouped path (an error where it cannot run)."""

    grouped_gemm: bool | None = None

    def __init__(self, config: ModelConfig, submodules: ExpertsSubmodules,
                 expert_indices: Sequence[int] | None = None) -> None:
        super().__init__()
        indices = list(range(config.num_moe_experts) if expert_indices is None
                       else expert_indices)
        mlp_submodules = MLPSubmodules(submodules.linear_fc1, submodules.linear_fc2)
        self.local_experts = nn.ModuleDict({
            str(e): MLP(config, mlp_submodules, ffn_hidden_size=config.moe_ffn_hidden_size)
            for e in indices
        })

    @property
    def expert_indices(self) -> list[int]:
        return [int(e) for e in self.local_experts]

    def forward(self, tokens: torch.Tensor, tokens_per_expert: list[int],
                probs: torch.Tensor) -> torch.Tensor:
        """`tokens [N, h]` grouped by expert (`tokens_per_expert` rows each, in index order),
        `probs [N]` their routing weights -> `[N, h]` the weighted expert outputs."""
        if self.grouped_gemm is not False and self._grouped_runs(tokens):
            return self._grouped_forward(tokens, tokens_per_expert, probs)
        if self.grouped_gemm:
            raise RuntimeError("grouped_gemm=True but torch._grouped_mm cannot run here")
        return self._loop_forward(tokens, tokens_per_expert, probs)

    def _compute_dtype(self, tokens: torch.Tensor) -> torch.dtype:
        kind = tokens.device.type
        if torch.is_autocast_enabled(kind):
            return torch.get_autocast_dtype(kind)
        return tokens.dtype

    def _grouped_runs(self, tokens: torch.Tensor) -> bool:
        """Plain linears, a supported device and dtype, and 16-byte aligned rows."""
        linears = [linear for expert in self.local_experts.values()
                   for linear in (expert.linear_fc1, expert.linear_fc2)]
        if not linears or not all(getattr(type(linear), "plain_linear", False)
                                  and "forward" not in linear.__dict__ for linear in linears):
            return False
        dtype = self._compute_dtype(tokens)
        fc1 = linears[0].weight
        if any(linear.weight.dtype != fc1.dtype for linear in linears):
            return False
        return (aligned(dtype, *fc1.shape, linears[1].weight.shape[1])
                and grouped_mm_available(tokens.device, dtype))

    def _grouped_forward(self, tokens: torch.Tensor, tokens_per_expert: list[int],
                         probs: torch.Tensor) -> torch.Tensor:
        """MLP.forward of every expert at once, operation for operation (`models/mlp.py`)."""
        experts = list(self.local_experts.values())
        fc1 = [expert.linear_fc1 for expert in experts]
        fc2 = [expert.linear_fc2 for expert in experts]
        dtype = self._compute_dtype(tokens)
        offs = group_offsets(tokens_per_expert, tokens.device)
        rows = None
        if fc1[0].bias is not None or fc2[0].bias is not None:
            counts = torch.tensor(tokens_per_expert, device=tokens.device)
            rows = torch.repeat_interleave(torch.arange(len(experts), device=tokens.device),
                                           counts, output_size=tokens.shape[0])

        def linear(x: torch.Tensor, layers: list[nn.Module]) -> torch.Tensor:
            weights = [layer.weight.to(dtype) for layer in layers]
            biases = (None if layers[0].bias is None
                      else [layer.bias.to(dtype) for layer in layers])
            with torch.autocast(tokens.device.type, enabled=False):
                out = grouped_linear(x.to(dtype).contiguous(), weights, offs, biases, rows)
            return contiguous_grad(out)

        intermediate = linear(tokens, fc1)
        if experts[0].gated:
            gate, up = intermediate.chunk(2, dim=-1)
            intermediate = F.silu(gate) * up
        else:
            intermediate = F.gelu(intermediate)
        scale = probs.unsqueeze(-1)
        output = linear((intermediate * scale).to(intermediate.dtype), fc2)
        if fc2[0].bias is None:  # a fresh tensor, not contiguous_grad's view: FSDP2 hooks the
            return output.clone()  # module's output, and an in-place op on a view drops the hook
        bias = torch.stack([layer.bias for layer in fc2])[rows]
        return output + ((scale - 1) * bias).to(output.dtype)

    def _loop_forward(self, tokens: torch.Tensor, tokens_per_expert: list[int],
                      probs: torch.Tensor) -> torch.Tensor:
        """One expert after another. Without autograd (decoding: a token or a few reach only
        top-k experts) an expert with no tokens is skipped; with it every expert runs, so each
        takes part in backward."""
        skip_idle = not torch.is_grad_enabled()
        outputs = [
            expert(chunk, per_token_scale=weights)
            for expert, chunk, weights, count in zip(
                self.local_experts.values(), tokens.split(tokens_per_expert),
                probs.split(tokens_per_expert), tokens_per_expert, strict=True)
            if count or not skip_idle
        ]
        return torch.cat(outputs, dim=0) if outputs else tokens.new_zeros(0, tokens.shape[-1])
