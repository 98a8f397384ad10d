"""Achieved TFLOP/s per device and MFU from a step's FLOPs, its time and the device's peak."""

from __future__ import annotations

import pytest
import torch

from mtp_cli import load_spec
from mtp_cli.plan.flops import num_floating_point_operations
from mtp_cli.train.flop_rate import FlopRate, cpu_peak_flops, gpu_peak_flops


def test_rate_and_mfu_by_hand():
    rate = FlopRate(flops_per_step=6e12, world_size=4, peak_flops=1e12)
    # 3 steps in 9 s over 4 devices: 6e12 x 3 / 9 / 4 = 0.5 TFLOP/s each, half the peak
    assert rate.metrics(3, 9.0) == pytest.approx({"tflops_per_device": 0.5, "mfu": 0.5})
    assert FlopRate(6e12, 4, None).metrics(3, 9.0) == pytest.approx({"tflops_per_device": 0.5})
    assert rate.metrics(0, 1.0) == {}


def test_gpu_peaks_by_device_name():
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4e12)
    assert gpu_peak_flops("NVIDIA H100 PCIe", "bf16") == pytest.approx(756e12)
    assert gpu_peak_flops("NVIDIA H200", "fp32") == pytest.approx(66.9e12)
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == pytest.approx(312e12)
    assert gpu_peak_flops("NVIDIA GeForce GTX 1080", "bf16") is None


def test_cpu_peak_is_measured_and_a_run_counts_its_step():
    peak = cpu_peak_flops("fp32")
    assert 1e8 < peak < 1e15  # a real GEMM rate, whatever this CPU is
    spec = load_spec("specs/tiny.yaml")
    rate = FlopRate.for_run(spec, torch.device("cpu"), world_size=1)
    assert rate.flops_per_step == num_floating_point_operations(spec, 16)
    assert rate.peak_flops is not None and rate.peak_flops > 0
