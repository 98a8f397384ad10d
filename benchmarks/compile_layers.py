"""`train.compile`: training tokens/s with each transformer layer compiled vs eager.

    python benchmarks/compile_layers.py                    # gpt_125m layers, 2 of them, s=256
    python benchmarks/compile_layers.py --layers 12 --seq 1024 --rounds 5

Builds two copies of gpt_125m (its layer shapes: hidden 768, 12 heads, GELU, one MTP depth) with
`--layers` decoder layers, compiles one (`mtp_cli.parallel.compile.apply_compile`), and times
optimizer steps (the trainer's `train_step`, fp32, one process) of both, interleaved over
`--rounds` rounds after the compiled copy's first step, whose extra time is reported apart as
the compile time. Prints the median tokens/s of each and compiled / eager.
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
from mtp_cli.data.batch import plain_batch
from mtp_cli.parallel.compile import apply_compile
from mtp_cli.train.optim import build_optimizer
from mtp_cli.train.step import StepSettings, train_step

SPEC = Path(__file__).resolve().parents[1] / "specs" / "gpt_125m.yaml"


def step_fn(spec, compiled: bool):
    model = build_model(spec)
    if compiled:
        apply_compile(model, True)
    optimizer = build_optimizer(model, spec.train)
    settings = StepSettings(num_microbatches=1, per_token_loss=False, grad_clip=1.0, bf16=False,
                            device=torch.device("cpu"), dp_cp_size=1, dp_cp_group=None)
    generator = torch.Generator().manual_seed(0)
    vocab, seq = spec.model.vocab_size, spec.model.seq_length

    def step() -> float:
        tokens = torch.randint(0, vocab, (spec.train.micro_batch_size, seq + 1),
                               generator=generator)
        start = time.perf_counter()
        train_step(model, optimizer, [plain_batch(tokens)], settings)
        return time.perf_counter() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    spec = load_spec(SPEC, [f"model.num_layers={args.layers}", f"model.seq_length={args.seq}",
                            "train.micro_batch_size=1", "train.global_batch_size=1",
                            "train.bf16=false"])
    eager, compiled = step_fn(spec, False), step_fn(spec, True)
    eager_first = eager()
    compile_seconds = compiled() - eager_first
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for round_ in range(args.rounds):
        order = ("eager", "compiled") if round_ % 2 == 0 else ("compiled", "eager")
        for name in order:
            times[name].append((eager if name == "eager" else compiled)())
    tokens = spec.model.seq_length * spec.train.micro_batch_size
    rate = {name: tokens / statistics.median(values) for name, values in times.items()}
    print(f"gpt_125m layers x {args.layers} + 1 MTP depth, s={args.seq}, fp32, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved steps")
    print(f"eager     {rate['eager']:8.1f} tokens/s")
    print(f"compiled  {rate['compiled']:8.1f} tokens/s   (compile time ~{compile_seconds:.0f} s)")
    print(f"compiled / eager = {rate['compiled'] / rate['eager']:.2f}x tokens/s")


if __name__ == "__main__":
    main()
