"""Achieved FLOP rate and model FLOP utilisation (MFU), as Megatron-LM and torchtitan log them.

achieved TFLOP/s per device = model FLOPs of the steps (`mtp_cli.plan.flops`) / seconds /
world size; MFU = achieved / the device's peak in the dtype the GEMMs run in (bf16 under
`train.bf16` autocast, fp32 otherwise, TF32 off as torch leaves it). GPU peaks are the vendors'
dense figures; a CPU has no such table, so its peak is measured once, at start, by a short GEMM
probe on the worker's threads (the best of a few 1024^3 products): MFU on CPU is relative to
what this machine's BLAS reaches, not to a datasheet.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from mtp_cli.config.schema import RunSpec
from mtp_cli.plan.flops import num_floating_point_operations

# dense TFLOP/s (no sparsity): bf16 tensor cores, fp32 CUDA cores; SXM unless named
GPU_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.4, "fp32": 66.9},
    "H100 NVL": {"bf16": 835.5, "fp32": 60.0},
    "H100 PCIe": {"bf16": 756.0, "fp32": 51.2},
    "H100": {"bf16": 989.4, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp32": 19.5},
}
PROBE_SIZE = 1024
PROBE_REPEATS = 3


def gpu_peak_flops(device_name: str, dtype: str) -> float | None:
    """The table's peak for a CUDA device name (`NVIDIA H100 80GB HBM3`), None if unknown."""
    for model, peaks in GPU_PEAK_TFLOPS.items():  # most specific names first
        if model.lower() in device_name.lower():
            return peaks[dtype] * 1e12
    return None


def cpu_peak_flops(dtype: str) -> float:
    """FLOP/s of the best of a few `PROBE_SIZE`^3 matrix products on this process's threads."""
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(PROBE_SIZE, PROBE_SIZE, generator=generator).to(torch_dtype)
            for _ in range(2))
    torch.mm(a, b)  # warm-up: threads started, kernels chosen
    best = float("inf")
    for _ in range(PROBE_REPEATS):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * PROBE_SIZE**3 / best


def device_peak_flops(device: torch.device, dtype: str) -> float | None:
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device), dtype)
    return cpu_peak_flops(dtype)


@dataclass
class FlopRate:
    """Turns (steps, seconds) into the logged `tflops_per_device` and `mfu`."""

    flops_per_step: float
    world_size: int
    peak_flops: float | None

    @classmethod
    def for_run(cls, spec: RunSpec, device: torch.device, world_size: int) -> FlopRate:
        dtype = "bf16" if spec.train.bf16 else "fp32"
        return cls(num_floating_point_operations(spec, spec.train.global_batch_size),
                   world_size, device_peak_flops(device, dtype))

    def metrics(self, steps: int, seconds: float) -> dict[str, float]:
        """`tflops_per_device` and, where the peak is known, `mfu` (a fraction)."""
        if steps <= 0 or seconds <= 0:
            return {}
        achieved = self.flops_per_step * steps / seconds / self.world_size
        out = {"tflops_per_device": achieved / 1e12}
        if self.peak_flops:
            out["mfu"] = achieved / self.peak_flops
        return out
