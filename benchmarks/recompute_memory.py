"""Activation memory and step time of `train.recompute: full | selective` against `none`.

    python benchmarks/recompute_memory.py                    # 4 layers + 1 MTP depth, batch 2
    python benchmarks/recompute_memory.py --attention-dropout 0.1   # SDPA's unfused path
    python benchmarks/recompute_memory.py --layers 12 --batch 1 --repeats 3
    python benchmarks/recompute_memory.py --device cuda --json results.json

Model: gpt_125m's layers (hidden 768, 12 heads, seq 1024, LayerNorm, GELU, learned positions,
tied output) with `--layers` decoder layers and one MTP depth; the vocabulary is cut to 4096 so
that the output heads' logits (the same in every mode, and the chunked head's business) do not
drown the layers' activations. One step = forward, masked-mean loss, backward, AdamW step.

What `selective` saves depends on the attention kernel: a fused (flash) kernel keeps only its
inputs, output and a `[b, heads, s]` log-sum-exp, so recomputing it frees almost nothing; the
unfused path (attention dropout, explicit or packed-document masks, where SDPA falls back to it)
keeps `[b, heads, s, s]` probabilities, which `selective` drops. `--attention-dropout 0.1` shows
that case.

Measured in a fresh process per mode, after one warm-up step (so Adam's state exists), from the
memory just before the step's forward:
* `held`: what the forward leaves alive for the backward (activations saved for backward) -
  memory at the end of the forward minus memory before it;
* `peak`: the highest memory during forward and backward above the same starting point
  (includes the gradients, the same in every mode, and the recomputed layer's activations).
CUDA: allocator statistics. CPU: resident set (`VmRSS`, `VmHWM`), with glibc's mmap threshold
pinned at 64 KiB for the measured process so that freed tensors go back to the system at once
and the resident set follows the live tensors (see benchmarks/mtp_memory.py for the probe).
Ratios are against `none` measured in the same run; step times are the fastest of `--steps`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mtp_memory import _Memory

REPO_ROOT = Path(__file__).resolve().parents[1]
MODES = ("none", "selective", "full")
VOCAB = 4096


@dataclass(frozen=True)
class Config:
    mode: str
    layers: int
    batch: int
    seq: int
    device: str
    steps: int
    attention_dropout: float = 0.0


def _spec(config: Config) -> dict:
    return {
        "model": {"vocab_size": VOCAB, "hidden_size": 768, "num_layers": config.layers,
                  "num_attention_heads": 12, "seq_length": config.seq,
                  "share_embeddings_and_output_weights": True,
                  "attention_dropout": config.attention_dropout},
        "mtp": {"num_layers": 1, "loss_scaling_factor": 0.3},
        "train": {"micro_batch_size": config.batch, "global_batch_size": config.batch,
                  "recompute": config.mode, "loss": {"chunked": False}},
    }


def measure(config: Config) -> dict:
    """One mode, in this (fresh) process: held and peak bytes, step seconds, first loss."""
    import torch

    memory = _Memory(config.device)
    sys.path.insert(0, str(REPO_ROOT))
    from mtp_cli import build_model, load_spec
    from mtp_cli.mtp import MTPRunState
    from mtp_cli.parallel.recompute import apply_activation_checkpointing

    spec = load_spec(_spec(config))
    model = build_model(spec, config.device)
    torch.manual_seed(0)  # the same dropout draws in every mode: the first losses must agree
    model.mtp_state = MTPRunState()
    apply_activation_checkpointing(model, spec.train.recompute)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (config.batch, config.seq + 1), generator=gen)
    tokens = tokens.to(config.device)
    mask = torch.ones(config.batch, config.seq, device=config.device)
    probe: dict[str, int] = {}

    def step() -> float:
        memory.sync()
        probe["before"] = memory.current()
        memory.reset_peak()
        per_token = model(tokens[:, :-1], labels=tokens[:, 1:], loss_mask=mask)
        loss = (per_token * mask).sum() / mask.sum()
        memory.sync()
        probe["held"] = memory.current() - probe["before"]
        loss.backward()
        memory.sync()
        probe["peak"] = memory.peak() - probe["before"]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    first_loss = step()
    held, peak, times = [], [], []
    for _ in range(config.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        held.append(probe["held"])
        peak.append(probe["peak"])
    return {**asdict(config), "held_bytes": max(held), "peak_bytes": max(peak),
            "step_seconds": min(times), "first_loss": first_loss}


def _run_fresh(config: Config) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(asdict(config))],
                          capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise RuntimeError(f"{config} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _table(results: dict[str, dict]) -> list[str]:
    base = results["none"]
    head = (f"{'recompute':>10} | {'held MiB':>9} {'x none':>7} | {'peak MiB':>9} {'x none':>7}"
            f" | {'step s':>7} {'x none':>7} | {'first loss':>10}")
    lines = [head, "-" * len(head)]
    for mode in MODES:
        row = results[mode]
        lines.append(
            f"{mode:>10} | {row['held_bytes'] / 2**20:9.0f} "
            f"{row['held_bytes'] / base['held_bytes']:7.2f} | {row['peak_bytes'] / 2**20:9.0f} "
            f"{row['peak_bytes'] / base['peak_bytes']:7.2f} | {row['step_seconds']:7.2f} "
            f"{row['step_seconds'] / base['step_seconds']:7.2f} | {row['first_loss']:10.6f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (gpt_125m: 12)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=2, help="measured steps after a warm-up")
    parser.add_argument("--attention-dropout", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=1,
                        help="fresh processes per mode, interleaved; keeps the highest memory "
                             "and the fastest step")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--json", type=Path, default=None, help="also write every result here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(Config(**json.loads(args.worker)))))
        return
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {device}, gpt_125m layers x {args.layers} + 1 MTP depth, batch {args.batch}, "
          f"seq {args.seq}, vocab {VOCAB}, attention dropout {args.attention_dropout}, "
          f"torch {torch.__version__}, {os.cpu_count()} cpus, "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    results: dict[str, dict] = {}
    everything = []
    for _, mode in itertools.product(range(args.repeats), MODES):
        result = _run_fresh(Config(mode, args.layers, args.batch, args.seq, device, args.steps,
                                   args.attention_dropout))
        everything.append(result)
        best = results.setdefault(mode, dict(result))
        for key in ("held_bytes", "peak_bytes"):
            best[key] = max(best[key], result[key])
        best["step_seconds"] = min(best["step_seconds"], result["step_seconds"])
        print(f"  done {mode}: held {result['held_bytes'] / 2**20:.0f} MiB, peak "
              f"{result['peak_bytes'] / 2**20:.0f} MiB, {result['step_seconds']:.2f} s",
              file=sys.stderr, flush=True)
    print("\n".join(_table(results)))
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps(everything, indent=1))
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
