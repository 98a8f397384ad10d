"""Linear layers with Megatron-Core's names and layouts (`weight` is `[out, in]`).

They compute plain `x @ W^T + b` on one device. Tensor parallelism is applied from outside
(`mtp_cli.parallel`): column-parallel layers are split along their output rows, row-parallel ones
along their input columns. `scaled_init` marks the layers Megatron initialises with
`std / sqrt(2 * num_layers)` (the projections that feed the residual stream).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtp_cli.config.schema import ModelConfig
from mtp_cli.nn.module_spec import register_module


class _Linear(nn.Module):
    scaled_init = False
    plain_linear = True  # forward is exactly F.linear(x, weight, bias): experts may group it

    def __init__(self, input_size: int, output_size: int, *, config: ModelConfig,
                 bias: bool = True) -> None:
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.weight = nn.Parameter(torch.empty(output_size, input_size))
        self.bias = nn.Parameter(torch.empty(output_size)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, bias={self.bias is not None}"


@register_module()
class ColumnParallelLinear(_Linear):
    """`Y = XA + b` with A split by output columns under tensor parallel."""


@register_module()
class RowParallelLinear(_Linear):
    """`Y = XA + b` with A split by input rows under tensor parallel; feeds the residual."""

    scaled_init = True
