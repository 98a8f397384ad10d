"""The peak of live tensor allocations over a block of code: the CUDA allocator's peak on a GPU,
and on CPU the same figure from c10's CPU allocator, read through torch's profiler.

On CPU, c10's `ProfiledCPUMemoryReporter` keeps a running total of live bytes; with its flag
`caffe2_report_cpu_memory_usage` on it counts every allocation and free on every thread (without
it, only those on the profiled thread: a tensor freed on one of gloo's threads would never leave
the sum), and `torch.profiler` with `profile_memory=True` records that total at each allocation
(`total_allocated`). The resident set's high-water mark (VmHWM) is reported beside it; it also
holds the interpreter, torch's libraries and malloc's retained pages.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class PeakMemory:
    """Filled in when the `measure_peak` block exits."""

    device: str
    peak: int = 0  # bytes of live tensors at the highest point
    rss_peak: int = 0  # VmHWM (0 where /proc is missing)


def count_every_thread() -> None:
    """Switch on c10's all-thread running total of CPU allocations (see the module docstring)."""
    lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libc10.so"))
    ctypes.c_bool.in_dll(lib, "FLAGS_caffe2_report_cpu_memory_usage").value = True


def rss_high_water_mark() -> int:
    status = Path("/proc/self/status")
    if not status.exists():
        return 0
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _cpu_peak(prof: torch.profiler.profile) -> int:
    def walk(nodes: list) -> Iterator:
        for node in nodes:
            yield node
            yield from walk(node.children)

    peak = 0
    for node in walk(prof.profiler.kineto_results.experimental_event_tree()):
        fields = node.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation" and fields.device.type == "cpu":
            peak = max(peak, fields.total_allocated)
    return peak


@contextlib.contextmanager
def measure_peak(device: torch.device) -> Iterator[PeakMemory]:
    """Measure the peak of live tensor bytes on `device` while the block runs."""
    result = PeakMemory(device.type)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result.peak = torch.cuda.max_memory_allocated(device)
    else:
        count_every_thread()
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            yield result
        result.peak = _cpu_peak(prof)
    result.rss_peak = rss_high_water_mark()
