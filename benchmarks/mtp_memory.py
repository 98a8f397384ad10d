"""Peak memory and step time of one MTP training step: chunked cross-entropy heads vs plain.

    python benchmarks/mtp_memory.py                 # full table (CPU: ~30-60 min on 2 cores)
    python benchmarks/mtp_memory.py --quick         # vocab 32k, seq 1024, D = 0 and 3
    python benchmarks/mtp_memory.py --recompute     # add the recompute-in-backward column
    python benchmarks/mtp_memory.py --vocab 131072 --seq 2048 --depths 0 3 --repeats 3
    python benchmarks/mtp_memory.py --device cuda --json results.json

Model: hidden 256, 2 layers (RMSNorm, SwiGLU, RoPE), batch 1, untied output, D = 0..3 MTP
depths; one step = forward, masked-mean loss, backward, AdamW step, zero_grad.

Every configuration runs in a fresh Python process (nothing cached or freed late by a previous
run can inflate or hide a peak). In it: build, one warm-up step (so Adam's state exists, as in
steady-state training), then reset the peak counter and time `--steps` more steps (the minimum
is reported).

Peak memory:
* CUDA: `torch.cuda.max_memory_allocated()` over the timed steps (live tensor bytes).
* CPU: the process's resident-set high-water mark (`VmHWM` in /proc/self/status) over the timed
  steps, reset beforehand by writing 5 to /proc/self/clear_refs, minus the resident set of the
  bare interpreter with torch imported (measured in the same process before building). This is
  physical memory, what an out-of-memory killer sees; glibc serves allocations above 32 MiB
  (every `[tokens, V]` tensor) with mmap and returns them on free, so the high-water mark follows
  the tensors' lifetimes; smaller blocks kept by malloc count too. Both paths run under the same
  allocator, so ratios are fair; absolute MiB include parameters, gradients and Adam state.

Step times on a shared CPU are noisy (other processes compete for the cores): `--repeats`
interleaves fresh runs of every mode so that each sees the same load, and keeps the fastest.
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

REPO_ROOT = Path(__file__).resolve().parents[1]
HIDDEN, LAYERS, BATCH = 256, 2, 1


@dataclass(frozen=True)
class Config:
    vocab: int
    seq: int
    depths: int
    mode: str  # plain | chunked | recompute
    device: str
    steps: int


def _spec(config: Config) -> dict:
    return {
        "model": {"vocab_size": config.vocab, "hidden_size": HIDDEN, "num_layers": LAYERS,
                  "num_attention_heads": 4, "seq_length": config.seq,
                  "normalization": "RMSNorm", "activation": "swiglu",
                  "position_embedding": "rope", "add_bias_linear": False},
        "mtp": {"num_layers": config.depths, "loss_scaling_factor": 0.3},
        "train": {"micro_batch_size": BATCH, "global_batch_size": BATCH,
                  "loss": {"chunked": config.mode != "plain"}},
    }


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


class _Memory:
    """Peak-memory probe: CUDA allocator statistics or the CPU resident-set high-water mark."""

    def __init__(self, device: str) -> None:
        import torch

        self.torch, self.cuda = torch, device.startswith("cuda")
        self.floor = 0 if self.cuda else _status_kib("VmRSS") * 1024

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")

    def current(self) -> int:
        if self.cuda:
            return self.torch.cuda.memory_allocated()
        return _status_kib("VmRSS") * 1024 - self.floor

    def peak(self) -> int:
        if self.cuda:
            return self.torch.cuda.max_memory_allocated()
        return _status_kib("VmHWM") * 1024 - self.floor


def measure(config: Config) -> dict:
    """One configuration, in this (fresh) process: peak bytes and step seconds."""
    import torch

    memory = _Memory(config.device)
    sys.path.insert(0, str(REPO_ROOT))
    from mtp_cli import build_model, load_spec
    from mtp_cli.mtp import MTPLossAutoScaler, MTPLossLoggingHelper

    model = build_model(load_spec(_spec(config)), config.device)
    model.loss_settings.chunked_grads_in_forward = {"chunked": True,
                                                    "recompute": False}.get(config.mode)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab, (BATCH, config.seq + 1), generator=gen)
    tokens = tokens.to(config.device)
    mask = torch.ones(BATCH, config.seq, device=config.device)
    MTPLossAutoScaler.set_loss_scale(1.0)

    def step() -> float:
        per_token = model(tokens[:, :-1], labels=tokens[:, 1:], loss_mask=mask)
        loss = (per_token * mask).sum() / mask.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        MTPLossLoggingHelper.clean_loss_in_tracker()
        return float(loss)

    first_loss = step()
    memory.sync()
    before = memory.current()
    memory.reset_peak()
    times = []
    for _ in range(config.steps):
        start = time.perf_counter()
        step()
        memory.sync()
        times.append(time.perf_counter() - start)
    return {**asdict(config), "peak_bytes": memory.peak(), "before_step_bytes": before,
            "step_seconds": min(times), "first_loss": first_loss}


def _run_fresh(config: Config) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(asdict(config))],
                          capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise RuntimeError(f"{config} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mib(value: int) -> str:
    return f"{value / 2**20:8.0f}"


def _table(results: dict[tuple, dict], modes: list[str]) -> list[str]:
    head = f"{'vocab':>7} {'seq':>5} {'D':>2} | {'plain MiB':>9} {'plain s':>8}"
    for mode in modes[1:]:
        head += f" | {mode + ' MiB':>13} {'x plain':>7} {'x plainD0':>9} {mode + ' s':>11} {'x plain':>7}"
    lines = [head, "-" * len(head)]
    for (vocab, seq, depths), row in sorted(results.items()):
        plain = row.get("plain")
        d0 = results.get((vocab, seq, 0), {}).get("plain")
        line = f"{vocab:>7} {seq:>5} {depths:>2} | "
        line += f"{_mib(plain['peak_bytes']):>9} {plain['step_seconds']:8.2f}" if plain else " " * 18
        for mode in modes[1:]:
            got = row.get(mode)
            if got is None or plain is None:
                line += " |" + " " * 52
                continue
            vs_d0 = f"{got['peak_bytes'] / d0['peak_bytes']:9.2f}" if d0 else f"{'-':>9}"
            line += (f" | {_mib(got['peak_bytes']):>13} {got['peak_bytes'] / plain['peak_bytes']:7.2f}"
                     f" {vs_d0} {got['step_seconds']:11.2f}"
                     f" {got['step_seconds'] / plain['step_seconds']:7.2f}")
        lines.append(line)
    return lines


def _acceptance(results: dict[tuple, dict]) -> list[str]:
    key, d0 = (131072, 2048, 3), (131072, 2048, 0)
    if key not in results or "plain" not in results[key] or "chunked" not in results[key]:
        return []
    plain, chunked = results[key]["plain"], results[key]["chunked"]
    lines = ["", "acceptance (vocab 128k, seq 2048, D = 3):"]
    ratio = chunked["peak_bytes"] / plain["peak_bytes"]
    lines.append(f"  peak chunked / plain        {ratio:5.2f}  (target <= 0.50)")
    ratio = chunked["step_seconds"] / plain["step_seconds"]
    lines.append(f"  step chunked / plain        {ratio:5.2f}  (target <= 1.10, grads in forward)")
    if "recompute" in results[key]:
        ratio = results[key]["recompute"]["step_seconds"] / plain["step_seconds"]
        lines.append(f"  step recompute / plain      {ratio:5.2f}  (target <= 1.40)")
    if d0 in results and "plain" in results[d0]:
        ratio = chunked["peak_bytes"] / results[d0]["plain"]["peak_bytes"]
        lines.append(f"  peak chunked D3 / plain D0  {ratio:5.2f}  (target <= 1.25)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="vocab 32k, seq 1024, D = 0 and 3")
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--depths", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--recompute", action="store_true",
                        help="also time gradients recomputed in backward")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up")
    parser.add_argument("--repeats", type=int, default=1,
                        help="fresh processes per configuration and mode, run interleaved; "
                             "the table shows the fastest step and the highest peak")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--json", type=Path, default=None, help="also write every result here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(Config(**json.loads(args.worker)))))
        return
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        args.vocab, args.seq, args.depths = [32768], [1024], [0, 3]
    modes = ["plain", "chunked"] + (["recompute"] if args.recompute else [])
    print(f"device {device}, hidden {HIDDEN}, {LAYERS} layers, batch {BATCH}, "
          f"{args.steps} timed steps (min), torch {torch.__version__}, "
          f"{os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}", flush=True)
    results: dict[tuple, dict] = {}
    everything = []
    keys = [(v, s, d) for v in args.vocab for s in args.seq for d in args.depths]
    for key, _, mode in itertools.product(keys, range(args.repeats), modes):
        result = _run_fresh(Config(*key, mode, device, args.steps))
        everything.append(result)
        best = results.setdefault(key, {}).setdefault(mode, dict(result))
        best["peak_bytes"] = max(best["peak_bytes"], result["peak_bytes"])
        best["step_seconds"] = min(best["step_seconds"], result["step_seconds"])
        print(f"  done {key} {mode}: {result['peak_bytes'] / 2**20:.0f} MiB, "
              f"{result['step_seconds']:.2f} s", file=sys.stderr, flush=True)
    print("\n".join(_table(results, modes) + _acceptance(results)))
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps(everything, indent=1))
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
