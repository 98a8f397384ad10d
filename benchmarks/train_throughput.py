"""Training throughput with D = 0, 1, 2 MTP depths, and what the FLOPs predict.

    python benchmarks/train_throughput.py                 # tiny and ~125M specs, D = 0 1 2
    python benchmarks/train_throughput.py --depths 0 1 2 3 --specs specs/tiny.yaml

For every spec and depth D it times real optimizer steps (the trainer's own `train_step`, one
process, on the default corpus) and prints tokens/s and the step-time ratio against D = 0 of
the same spec, measured in the same run, beside the ratio the FLOP count predicts:

    training FLOPs per token = 3 x forward, forward = 2 x (matmul weights used)
                               + 4 x s x (heads x kv_channels) per attention layer
    main model: decoder layers + output head; each MTP depth: eh_proj (2h -> h) + one
    transformer layer + the output head again.

Attention is counted in full (Megatron's convention), not halved for the causal mask.
Loss variants (`--loss full chunked`) map to `train.loss.chunked`; the chunked head computes
its gradients in the forward pass, so it does the same FLOPs as the full one (its memory is
measured by `benchmarks/mtp_memory.py`).

Before / after in one run: `--compare-to PATH` (a checkout of the code before, e.g.
`git worktree add /tmp/wt-old fd99f79`) runs this script on that checkout and on this one in
turn, `--rounds` times each in fresh processes (before, after, before, ...), and prints each
case's median step time after / before (<= 1 = at least as fast).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# this checkout's mtp_cli, or the one MTP_BENCH_CODE names (--compare-to sets it)
sys.path.insert(0, os.environ.get("MTP_BENCH_CODE", str(Path(__file__).resolve().parents[1])))

from mtp_cli import build_model, load_spec
from mtp_cli.config.schema import RunSpec
from mtp_cli.data import MicroBatchLoader, build_datasets
from mtp_cli.train.optim import build_optimizer
from mtp_cli.train.step import StepSettings, train_step

ROOT = Path(__file__).resolve().parents[1]
CODE_ENV = "MTP_BENCH_CODE"

# Per spec: overrides that keep a CPU run to seconds per step (batch, sequence).
SPEC_OVERRIDES = {
    "specs/tiny.yaml": [],
    "specs/gpt_125m.yaml": ["model.seq_length=256", "train.micro_batch_size=1",
                            "train.global_batch_size=1"],
}
LOSS_VARIANTS = {"full": "train.loss.chunked=false", "chunked": "train.loss.chunked=true"}


@dataclass
class Result:
    spec: str
    depths: int
    loss: str
    tokens_per_step: int
    step_seconds: float
    flops_per_token: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_seconds


def matmul_weights(module: torch.nn.Module) -> int:
    """Parameters used as matmul weights (2-D; embeddings are lookups and are excluded)."""
    return sum(p.numel() for n, p in module.named_parameters()
               if p.ndim == 2 and "word_embeddings" not in n and "position_embeddings" not in n)


def flops_per_token(spec: RunSpec) -> float:
    """Training FLOPs per token of the main model plus every MTP depth (see module docstring)."""
    model = build_model(spec, "meta")
    config = spec.model
    attention = 4 * config.seq_length * config.num_attention_heads * config.kv_channels
    head = 2 * config.hidden_size * config.vocab_size
    forward = 2 * matmul_weights(model.decoder) + config.num_layers * attention + head
    if model.mtp is not None:
        for depth in range(spec.mtp.num_layers):
            layer = model.mtp.layer_for_depth(depth)
            forward += 2 * matmul_weights(layer) + attention + head
    return 3.0 * forward


class Runner:
    """One (spec, D, loss) case: its model, optimizer and micro-batch stream."""

    def __init__(self, spec_path: str, depths: int, loss: str, bf16: bool) -> None:
        overrides = [*SPEC_OVERRIDES.get(spec_path, []), f"mtp.num_layers={depths}",
                     LOSS_VARIANTS[loss]]
        if not bf16:
            overrides.append("train.bf16=false")
        self.spec_path, self.depths, self.loss = spec_path, depths, loss
        self.spec = spec = load_spec(spec_path, overrides)
        train_set, _ = build_datasets(spec)
        self.loader = MicroBatchLoader(
            train_set, micro_batch_size=spec.train.micro_batch_size, dp_rank=0, dp_size=1,
            seed=spec.train.seed, global_batch_size=spec.train.global_batch_size)
        self.model = build_model(spec)
        self.optimizer = build_optimizer(self.model, spec.train)
        self.micro = spec.train.global_batch_size // spec.train.micro_batch_size
        self.settings = StepSettings(
            num_microbatches=self.micro, per_token_loss=spec.train.calculate_per_token_loss,
            grad_clip=spec.train.grad_clip, bf16=spec.train.bf16, device=torch.device("cpu"),
            dp_cp_size=1, dp_cp_group=None)
        self.times: list[float] = []

    def step(self, timed: bool) -> None:
        batches = [self.loader.next_batch() for _ in range(self.micro)]
        started = time.perf_counter()
        train_step(self.model, self.optimizer, batches, self.settings)
        if timed:
            self.times.append(time.perf_counter() - started)

    def result(self) -> Result:
        spec = self.spec
        return Result(self.spec_path, self.depths, self.loss,
                      spec.train.global_batch_size * spec.model.seq_length,
                      statistics.median(self.times), flops_per_token(spec))


def measure(spec_path: str, loss: str, args: argparse.Namespace) -> list[Result]:
    """Every depth of one spec, timed round-robin (D0, D1, D2, D0, ...) so that a machine
    whose load changes during the run slows every depth alike."""
    runners = [Runner(spec_path, depths, loss, args.bf16) for depths in sorted(args.depths)]
    steps = args.steps if "tiny" in spec_path else args.large_steps
    for index in range(args.warmup + steps):
        for runner in runners:
            runner.step(timed=index >= args.warmup)
    return [runner.result() for runner in runners]


def report(results: list[Result]) -> None:
    header = (f"{'spec':<22}{'loss':<8}{'D':>3}{'tokens/step':>13}{'step s':>10}{'tokens/s':>11}"
              f"{'time ratio':>12}{'FLOP ratio':>12}")
    print(header)
    print("-" * len(header))
    for result in results:
        base = next(r for r in results if (r.spec, r.loss, r.depths) ==
                    (result.spec, result.loss, 0)) if any(
            r.depths == 0 and r.spec == result.spec for r in results) else result
        print(f"{result.spec:<22}{result.loss:<8}{result.depths:>3}{result.tokens_per_step:>13}"
              f"{result.step_seconds:>10.3f}{result.tokens_per_s:>11.0f}"
              f"{result.step_seconds / base.step_seconds:>12.3f}"
              f"{result.flops_per_token / base.flops_per_token:>12.3f}")


def compare(args: argparse.Namespace, argv: list[str]) -> None:
    """Run this script on `--compare-to` and on this checkout in turn; print after / before."""
    forwarded = [a for a in argv if not a.startswith("--compare-to")
                 and a != str(args.compare_to)]
    runs: dict[str, list[list[dict]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(args.rounds):
            for label, code in (("before", args.compare_to.resolve()), ("after", ROOT)):
                out = Path(tmp) / f"{label}{index}.json"
                env = {**os.environ, CODE_ENV: str(code), "PYTHONPATH": str(code)}
                subprocess.run([sys.executable, str(Path(__file__).resolve()), *forwarded,
                                "--json", str(out)], env=env, check=True)
                runs[label].append(json.loads(out.read_text()))
    print(f"\nbefore = {args.compare_to}, after = {ROOT}; median step seconds over "
          f"{args.rounds} rounds")
    print(f"{'spec':<22}{'loss':<8}{'D':>3}{'before s':>10}{'after s':>10}{'after/before':>14}")
    for i, row in enumerate(runs["after"][0]):
        before = statistics.median(r[i]["step_seconds"] for r in runs["before"])
        after = statistics.median(r[i]["step_seconds"] for r in runs["after"])
        print(f"{row['spec']:<22}{row['loss']:<8}{row['depths']:>3}{before:>10.3f}"
              f"{after:>10.3f}{after / before:>14.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--specs", nargs="+", default=list(SPEC_OVERRIDES))
    parser.add_argument("--depths", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--loss", nargs="+", default=["full"], choices=list(LOSS_VARIANTS))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="timed steps, tiny spec")
    parser.add_argument("--large-steps", type=int, default=3, help="timed steps, other specs")
    parser.add_argument("--bf16", action="store_true", help="keep the spec's train.bf16")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--compare-to", type=Path,
                        help="a checkout of the code before: time both, print after / before")
    parser.add_argument("--rounds", type=int, default=2, help="with --compare-to: runs each")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.compare_to is not None:
        compare(args, sys.argv[1:])
        return
    print(f"code {os.environ.get(CODE_ENV, ROOT)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; "
          f"bf16 {'as in the spec' if args.bf16 else 'off'}; median of timed steps")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [r for spec in args.specs for loss in args.loss for r in measure(spec, loss, args)]
    report(results)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results]) + "\n")


if __name__ == "__main__":
    main()
