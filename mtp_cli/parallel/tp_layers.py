"""Tensor-parallel linear layers that hold this rank's shard of a single-device linear.

They keep the parameter names (`weight`, `bias`) and `scaled_init` of the layer they replace, so
state-dict keys, initialisation and optimizers see the same names as on one device, only with
local shapes. Parameters are plain `nn.Parameter`s (no DTensor), so data parallel (DDP or FSDP2
over the data-parallel mesh) wraps the converted model unchanged.

Activations between layers are replicated over the TP ranks (`[s, b, h]`), or, with sequence
parallel, split along the sequence (`[s/tp, b, h]`); these layers convert at their edges.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mtp_cli.parallel.tp_mappings import (
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    gather_last_dim,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from mtp_cli.parallel.tp_sharding import ShardRule


def _local_parameter(param: torch.Tensor | None, rule: ShardRule | None,
                     group: dist.ProcessGroup | None) -> nn.Parameter | None:
    """This rank's slice of `param` (or `param` itself when replicated), as a new Parameter."""
    if param is None:
        return None
    value = param.detach() if rule is None else rule.shard_for(param.detach(), group)
    return nn.Parameter(value, requires_grad=param.requires_grad)


class _ShardedLinear(nn.Module):
    def __init__(self, source: nn.Module, weight_rule: ShardRule, bias_rule: ShardRule | None,
                 *, group: dist.ProcessGroup, sequence_parallel: bool) -> None:
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.scaled_init = bool(getattr(source, "scaled_init", False))
        self.full_shape = tuple(source.weight.shape)  # [out, in] of the whole layer
        self.weight = _local_parameter(source.weight, weight_rule, group)
        self.bias = _local_parameter(getattr(source, "bias", None), bias_rule, group)

    def extra_repr(self) -> str:
        out, inp = self.full_shape
        return (f"in={inp}, out={out}, local={tuple(self.weight.shape)}, "
                f"bias={self.bias is not None}, sequence_parallel={self.sequence_parallel}")


class ColumnShardedLinear(_ShardedLinear):
    """`Y_r = X A_r^T + b_r`: this rank's output rows.

    Input: the replicated activation (or, with sequence parallel, this rank's sequence slice,
    all-gathered here). Output: `[..., out/tp]`, or with `gather_output` the full `[..., out]`
    back in the activation layout (replicated, or sequence-split under sequence parallel):
    what `eh_proj` needs, as in Megatron's MTP layer.
    """

    def __init__(self, source: nn.Module, rule: ShardRule, *, group: dist.ProcessGroup,
                 sequence_parallel: bool, gather_output: bool = False) -> None:
        super().__init__(source, rule, rule, group=group, sequence_parallel=sequence_parallel)
        self.gather_output = gather_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, self.group)
        else:
            x = copy_to_tensor_parallel_region(x, self.group)
        y = F.linear(x, self.weight, self.bias)
        if self.gather_output:
            y = gather_last_dim(y, self.group)
            if self.sequence_parallel:
                y = scatter_to_sequence_parallel_region(y, self.group)
        return y


class RowShardedLinear(_ShardedLinear):
    """`Y = Σ_r X_r A_r^T + b`: this rank's input columns; the bias is replicated.

    Input: `[..., in/tp]` from a column-parallel computation. Output: the partial products
    summed over the TP ranks (all-reduce), or under sequence parallel summed and split along the
    sequence (reduce-scatter); the bias is added after the sum.
    """

    def __init__(self, source: nn.Module, rule: ShardRule, *, group: dist.ProcessGroup,
                 sequence_parallel: bool) -> None:
        super().__init__(source, rule, None, group=group, sequence_parallel=sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(y, self.group)
        else:
            y = reduce_from_tensor_parallel_region(y, self.group)
        return y if self.bias is None else y + self.bias


class DuplicatedLinear(nn.Module):
    """`Y = X A^T (+ b)` with the whole weight on every TP rank (Megatron's `parallel_mode=
    "duplicated"`): MLA's down projections, whose outputs are latents too narrow to split.

    No communication: it runs on the activation as it comes, replicated or, under sequence
    parallel, this rank's sequence slice. Its gradient is then complete on every rank (without
    sequence parallel: the latents' gradients come back all-reduced by the column-parallel up
    projections) or partial (with it: this rank's tokens only), and is summed over the TP ranks
    with the other replicated parameters (`mtp_cli.parallel.tp_grads`).
    """

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self.scaled_init = bool(getattr(source, "scaled_init", False))
        self.weight = _local_parameter(source.weight, None, None)
        self.bias = _local_parameter(getattr(source, "bias", None), None, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        out, inp = self.weight.shape
        return f"in={inp}, out={out}, bias={self.bias is not None}, duplicated"


class SharedAcrossHeads:
    """MLA's decoupled RoPE key `[s, b, rope]` -> the layout every local head reads: whole
    sequence, one copy per rank; in backward, the sum of the ranks' heads' gradients.

    Without sequence parallel it is already whole: forward identity, backward all-reduce
    (`copy_to_tensor_parallel_region`). With sequence parallel it is this rank's slice:
    all-gathered along the sequence, reduce-scattered in backward (Megatron-Core's
    `gather_from_sequence_parallel_region` of `k_pos_emb`)."""

    def __init__(self, group: dist.ProcessGroup, sequence_parallel: bool) -> None:
        self.group, self.sequence_parallel = group, sequence_parallel

    def __call__(self, k_pe: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            return gather_from_sequence_parallel_region(k_pe, self.group)
        return copy_to_tensor_parallel_region(k_pe, self.group)


class ExpertShardedLinear(_ShardedLinear):
    """A routed expert's `linear_fc1` (column: its output rows) or `linear_fc2` (row: its input
    columns) shard under expert tensor parallel, with no communication of its own: as in
    Megatron-Core's experts, the token dispatcher enters the expert-tensor region before the
    experts (all-gather of the routed tokens, or under replicated activations an identity whose
    backward sums the ranks' input gradients) and leaves it after them (reduce-scatter or
    all-reduce of the partial `linear_fc2` outputs): `mtp_cli.parallel.expert_tensor`.

    No bias: a row shard's bias would be added once per rank before the reduction (runs with
    `model.add_bias_linear` and expert tensor parallel are refused before launch)."""

    plain_linear = True  # forward is F.linear(x, weight): the experts' grouped GEMM may run it

    def __init__(self, source: nn.Module, rule: ShardRule, *, group: dist.ProcessGroup) -> None:
        if getattr(source, "bias", None) is not None:
            raise ValueError("expert tensor parallel splits bias-free expert linears only")
        super().__init__(source, rule, None, group=group, sequence_parallel=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)
