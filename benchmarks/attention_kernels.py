"""Attention kernels on the CPU, each figure a ratio measured in the same run:

* packed documents (one causal SDPA call per document, `packed_causal_attention`) against one
  causal call over the whole sequence, and against the dense `[s, s]` document mask the code
  used before (mask + SDPA, rebuilt here as the reference): forward + backward time and the
  peak of live tensor bytes (c10's allocator through torch.profiler, `launch/memory_probe.py`);
* grouped-query attention through SDPA's `enable_gqa` against copying K and V per head
  (`repeat_interleave`, the code before): forward + backward time and peak.

    python benchmarks/attention_kernels.py                  # s=4096, 8 heads of 64, 4 documents
    python benchmarks/attention_kernels.py --seq 2048 --repeats 7

Times are medians over `--repeats` rounds, the variants interleaved within each round (a drift of
the machine's speed hits all alike). Targets: packed <= 1.15x causal time, and packed's peak
within a few percent of causal's (no s x s buffer: at s=4096 a boolean mask is 16 MiB, the
float bias SDPA makes of it 64 MiB).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtp_cli.launch.memory_probe import measure_peak
from mtp_cli.models.attention import packed_causal_attention, packed_document_mask
from mtp_cli.nn.packed import PackedSeqParams

Variant = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def packed_params(seq: int, documents: int) -> PackedSeqParams:
    """`documents` equal documents filling `seq` positions."""
    bounds = torch.linspace(0, seq, documents + 1).round().to(torch.int32)
    return PackedSeqParams(cu_seqlens_q=bounds, cu_seqlens_kv=bounds)


def document_variants(seq: int, documents: int) -> dict[str, Variant]:
    """causal (no documents), packed (per-document calls), dense_mask (the reference)."""
    params = packed_params(seq, documents)
    sdpa = F.scaled_dot_product_attention

    def dense_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        mask = packed_document_mask(seq, params, q.device)  # True = masked
        return sdpa(q, k, v, attn_mask=~mask)

    return {
        "causal": lambda q, k, v: sdpa(q, k, v, is_causal=True),
        "packed": lambda q, k, v: packed_causal_attention(q, k, v, params, sdpa),
        "dense_mask": dense_mask,
    }


def gqa_variants(heads: int, groups: int) -> dict[str, Variant]:
    """enable_gqa (K/V as they are) against per-head copies."""
    sdpa = functools.partial(F.scaled_dot_product_attention, is_causal=True)

    def copies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k, v = (x.repeat_interleave(heads // groups, dim=1) for x in (k, v))
        return sdpa(q, k, v)

    return {"enable_gqa": lambda q, k, v: sdpa(q, k, v, enable_gqa=groups != heads),
            "copies": copies}


def inputs(seq: int, heads: int, groups: int, dim: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, seq, dim, generator=generator)
    k, v = (torch.randn(1, groups, seq, dim, generator=generator) for _ in range(2))
    return tuple(x.requires_grad_() for x in (q, k, v))


def forward_backward(variant: Variant, tensors: tuple[torch.Tensor, ...]) -> float:
    """Seconds of one forward and backward (gradients cleared first)."""
    for x in tensors:
        x.grad = None
    started = time.perf_counter()
    variant(*tensors).sum().backward()
    return time.perf_counter() - started


def measure(variants: dict[str, Variant], tensors: tuple[torch.Tensor, ...], repeats: int
            ) -> dict[str, dict[str, float]]:
    """Median seconds (interleaved rounds, after one warm-up each) and peak MiB per variant."""
    for variant in variants.values():
        forward_backward(variant, tensors)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, variant in variants.items():
            seconds[name].append(forward_backward(variant, tensors))
    out = {}
    for name, variant in variants.items():
        for x in tensors:
            x.grad = None
        with measure_peak(torch.device("cpu")) as peak:
            forward_backward(variant, tensors)
        out[name] = {"seconds": statistics.median(seconds[name]), "peak_mib": peak.peak / 2**20}
    return out


def report(title: str, rows: dict[str, dict[str, float]], base: str) -> None:
    print(title)
    for name, row in rows.items():
        print(f"  {name:11s} {row['seconds']:8.3f} s ({row['seconds'] / rows[base]['seconds']:5.2f}x"
              f" {base})  peak {row['peak_mib']:8.1f} MiB "
              f"({row['peak_mib'] - rows[base]['peak_mib']:+7.1f} MiB vs {base})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--documents", type=int, default=4)
    parser.add_argument("--groups", type=int, default=1, help="query groups of the GQA case")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, float32; "
          f"s={args.seq}, {args.heads} heads of {args.head_dim}, forward + backward")
    tensors = inputs(args.seq, args.heads, args.heads, args.head_dim)
    documents = measure(document_variants(args.seq, args.documents), tensors, args.repeats)
    report(f"{args.documents} packed documents:", documents, "causal")
    packed, dense = documents["packed"]["seconds"], documents["dense_mask"]["seconds"]
    print(f"  packed / dense mask (after / before): {packed / dense:.2f}x time, "
          f"{documents['packed']['peak_mib'] - documents['dense_mask']['peak_mib']:+.1f} MiB")
    tensors = inputs(args.seq, args.heads, args.groups, args.head_dim)
    gqa = measure(gqa_variants(args.heads, args.groups), tensors, args.repeats)
    report(f"GQA, {args.heads} heads / {args.groups} group(s):", gqa, "copies")
    if args.json:
        args.json.write_text(json.dumps({"documents": documents, "gqa": gqa}, indent=2) + "\n")


if __name__ == "__main__":
    main()
