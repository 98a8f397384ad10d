"""Routed experts: the per-expert loop vs one grouped GEMM per projection (`torch._grouped_mm`).

    python benchmarks/expert_gemm.py                       # 64 experts, top-8, h 512, ffn 256
    python benchmarks/expert_gemm.py --tokens 4096 --repeats 9 --dtype bfloat16

Builds one DeepSeek-like MoE layer's `SequentialMLP` (SwiGLU experts with the model's own
`MLP`/linears, so the loop pays what training pays and the grouped path stacks the stored
weights at call time), routes `--tokens` tokens to their top-k experts at random, and times
forward + backward of both paths on the same inputs: one of each per round, the order
alternating, `--repeats` rounds after a warm-up; prints the medians and grouped / loop. The
default path (`SequentialMLP.grouped_gemm = None`: grouped wherever `_grouped_mm` runs) was
picked by this measurement (figures in mtp_cli/models/moe/grouped_gemm.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's mtp_cli

from mtp_cli import build_model, load_spec
from mtp_cli.models.moe.experts import SequentialMLP
from mtp_cli.models.moe.grouped_gemm import grouped_mm_available


def build_experts(args: argparse.Namespace) -> SequentialMLP:
    model = {"vocab_size": 64, "hidden_size": args.hidden, "num_layers": 1,
             "num_attention_heads": 8, "seq_length": 16, "normalization": "RMSNorm",
             "activation": "swiglu", "position_embedding": "rope", "add_bias_linear": False,
             "num_moe_experts": args.experts, "moe_router_topk": args.topk,
             "moe_ffn_hidden_size": args.ffn}
    built = build_model(load_spec({"model": model, "mtp": {"num_layers": 0}}))
    return built.decoder.layers["0"].mlp.experts


def routed_inputs(args: argparse.Namespace) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """Tokens grouped by expert as the dispatcher hands them over: `[T * k, h]`, counts."""
    generator = torch.Generator().manual_seed(0)
    choice = torch.rand(args.tokens, args.experts, generator=generator).topk(args.topk).indices
    counts = torch.bincount(choice.flatten(), minlength=args.experts).tolist()
    tokens = torch.randn(sum(counts), args.hidden, generator=generator)
    probs = torch.rand(sum(counts), generator=generator)
    return tokens, counts, probs


def time_step(experts: SequentialMLP, grouped: bool, tokens: torch.Tensor, counts: list[int],
              probs: torch.Tensor, dtype: torch.dtype) -> float:
    experts.grouped_gemm = grouped
    experts.zero_grad(set_to_none=True)
    x = tokens.clone().requires_grad_()
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        out = experts(x, counts, probs)
    out.float().backward(torch.ones(out.shape))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if not grouped_mm_available("cpu", dtype):
        raise SystemExit(f"torch._grouped_mm does not run on this CPU in {args.dtype}")
    experts = build_experts(args)
    tokens, counts, probs = routed_inputs(args)
    times: dict[bool, list[float]] = {False: [], True: []}
    for grouped in (False, True):  # warm-up
        time_step(experts, grouped, tokens, counts, probs, dtype)
    for round_ in range(args.repeats):
        for grouped in ((False, True) if round_ % 2 == 0 else (True, False)):
            times[grouped].append(time_step(experts, grouped, tokens, counts, probs, dtype))
    loop, grouped = statistics.median(times[False]), statistics.median(times[True])
    print(f"{args.experts} experts, top-{args.topk}, hidden {args.hidden}, expert ffn "
          f"{args.ffn}, {args.tokens} tokens, {args.dtype}, forward+backward, median of "
          f"{args.repeats} interleaved rounds, {torch.get_num_threads()} threads")
    print(f"loop     {loop * 1e3:8.1f} ms")
    print(f"grouped  {grouped * 1e3:8.1f} ms")
    print(f"grouped / loop = {grouped / loop:.2f}x")


if __name__ == "__main__":
    main()
