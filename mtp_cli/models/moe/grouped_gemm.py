"""Grouped expert GEMMs: every routed expert's matmul in one call, on tokens grouped by expert.

`torch._grouped_mm(x [N, in], w [G, in, out], offs=[G] int32 row ends)` multiplies each block of
rows of `x` by its expert's matrix (torchtitan's and Megatron-Core's grouped MLP). It runs on
CUDA (bf16; what it is for) and, in torch >= 2.8, on CPU too (fp32/bf16/fp16), where it computes
what the per-expert loop computes (the same GEMMs one after another; equal bits measured here).
Its rules: every row stride 16-byte aligned (`in` and `out` times the element size multiples of
16), fp32/bf16/fp16 only, and an incoming gradient that is not a stride-0 expansion (a `sum()`'s
gradient is one: `contiguous_grad` makes it dense).

Which path `SequentialMLP` takes by default, measured by `benchmarks/expert_gemm.py`
(forward + backward, 64 experts, top-8, hidden 512, expert ffn 256, 2048 tokens, fp32, median of
7 interleaved rounds): on the shared 2-core CPU (load ~15) grouped / loop = 0.66x (14.5 s vs
21.9 s; stacking the weights costs less than 2 x 64 separate GEMM calls, their splits and the
concatenation), so the grouped path is the default wherever it is available; on CUDA it runs in
bf16 under autocast (one kernel per projection instead of 2 x 64 launches), where it matters most.
"""

from __future__ import annotations

import torch

GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a dense gradient (`_grouped_mm`'s backward refuses a
    stride-0 one, which `out.sum().backward()` produces)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad.contiguous()


def contiguous_grad(x: torch.Tensor) -> torch.Tensor:
    return _ContiguousGrad.apply(x)


_PROBED: dict[tuple[torch.device, torch.dtype], bool] = {}


def _probe(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether one tiny aligned `_grouped_mm` (forward and backward) runs on `device`/`dtype`:
    its support depends on the build and, on CUDA, on the architecture."""
    try:
        rows = 16
        x = torch.ones(rows, 16, device=device, dtype=dtype, requires_grad=True)
        w = torch.ones(2, 16, 16, device=device, dtype=dtype, requires_grad=True)
        offs = torch.tensor([8, rows], device=device, dtype=torch.int32)
        out = torch._grouped_mm(x, w, offs=offs)
        out.backward(torch.ones_like(out))
        return bool(torch.isfinite(out).all())
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return False


def grouped_mm_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` runs here for `dtype` (probed once per device and dtype).
    `benchmarks/gpu_check.py` calls it to say which path a GPU run takes."""
    if not hasattr(torch, "_grouped_mm") or dtype not in GROUPED_DTYPES:
        return False
    device = torch.device(device)
    if device.type == "meta":
        return False
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if torch.compiler.is_compiling():
        # traced code cannot run the probe; `train.compile` probes before compiling. And the
        # operator's fake (shape) function takes bf16 only in torch 2.13: fp32 keeps the loop.
        return dtype == torch.bfloat16 and _PROBED.get((device, dtype), False)
    if (device, dtype) not in _PROBED:
        _PROBED[device, dtype] = _probe(device, dtype)
    return _PROBED[device, dtype]


def aligned(dtype: torch.dtype, *sizes: int) -> bool:
    """`_grouped_mm`'s alignment rule: each size's rows span a multiple of 16 bytes."""
    width = torch.empty(0, dtype=dtype).element_size()
    return all(size * width % 16 == 0 for size in sizes)


def group_offsets(tokens_per_expert: list[int], device: torch.device) -> torch.Tensor:
    """The row where each expert's block ends (`offs` of `_grouped_mm`), int32."""
    counts = torch.tensor(tokens_per_expert, dtype=torch.int32, device=device)
    return torch.cumsum(counts, 0, dtype=torch.int32)


def grouped_linear(x: torch.Tensor, weights: list[torch.Tensor], offs: torch.Tensor,
                   biases: list[torch.Tensor | None] | None = None,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
    """`x [N, in]` (expert-grouped rows, block g ending at `offs[g]`) times each block's
    `weights[g] [out, in]` transposed, plus `biases[g]` (`rows [N]`: each row's expert)."""
    stacked = torch.stack(weights).transpose(1, 2)  # [G, in, out], a view of the stack
    out = torch._grouped_mm(x, stacked, offs=offs)
    if biases is not None and rows is not None:
        out = out + torch.stack(biases)[rows]  # type: ignore[arg-type]
    return out
