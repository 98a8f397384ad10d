"""A single-process `mtp train specs/tiny.yaml` on a loaded CPU: steps before the first
checkpoint against steps after it, with today's OpenMP waiting and with the launcher's.

    python benchmarks/omp_stall.py                      # 15 steps, checkpoint at step 10
    python benchmarks/omp_stall.py --steps 15 --checkpoint 10 --load 2

The benchmark starts one busy-loop process per core (`--load`, default: every core) for the
length of the run and kills them when it ends (also on an error or Ctrl-C). Each run trains with
a metrics line per step; a step's time is its `tokens_per_s` turned back into seconds (the step
alone: no checkpoint, no validation). `before` forces libgomp's default spinning
(`GOMP_SPINCOUNT=300000`, what a run got before `mtp train` chose `OMP_WAIT_POLICY=PASSIVE`),
`after` leaves the launcher's choice. The figures are, per run, the ratio of steps 1-5 to the
last five steps (after the checkpoint), summed and by median step (step 1 carries one-time
warm-up); target within 1.5x. The machine's own load moves single steps of a tiny model, so
`after` runs `--repeats` times (the median ratio is the figure); `before` runs once (minutes).
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BEFORE_ENV = {"GOMP_SPINCOUNT": "300000"}  # libgomp's default spin count with no wait policy
BUSY_LOOP = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"


@contextmanager
def background_load(processes: int, seconds: float) -> Iterator[None]:
    """`processes` busy loops, each ending by itself after `seconds` at the latest and killed
    when the block ends."""
    loops = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP.format(seconds=seconds)])
             for _ in range(processes)]
    try:
        yield
    finally:
        for loop in loops:
            loop.kill()
        for loop in loops:
            loop.wait()


def step_seconds(metrics: Path) -> dict[int, float]:
    """Step -> seconds of that step, from metrics.jsonl's per-step lines."""
    times, tokens = {}, 0
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        if "tokens_per_s" not in row:
            continue
        step_tokens, tokens = row["tokens"] - tokens, row["tokens"]
        times[int(row["step"])] = step_tokens / row["tokens_per_s"]
    return times


def train(label: str, env: dict[str, str], args: argparse.Namespace, root: Path
          ) -> dict[int, float]:
    """One `mtp train` run; its per-step seconds."""
    run_dir = root / label
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                                                               "OMP_NUM_THREADS")}
    command = [sys.executable, "-m", "mtp_cli", "train", "specs/tiny.yaml", "--run-dir",
               str(run_dir), f"train.steps={args.steps}", "train.log_interval=1",
               f"checkpoint.interval={args.checkpoint}", "train.eval_interval=0",
               f"train.global_batch_size={args.global_batch}", *args.set]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True,
                          env={**clean, "PYTHONPATH": str(REPO_ROOT), **env},
                          timeout=args.timeout)
    if done.returncode:
        raise SystemExit(f"{label} failed:\n{done.stderr[-2000:]}")
    print(f"{label}: {time.perf_counter() - started:.0f} s wall", flush=True)
    return step_seconds(run_dir / "metrics.jsonl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--checkpoint", type=int, default=10, help="checkpoint.interval")
    parser.add_argument("--global-batch", type=int, default=2,
                        help="train.global_batch_size (the spec's 16 takes ~50 s a step "
                             "before the fix on a loaded 2-core machine)")
    parser.add_argument("--load", type=int, default=os.cpu_count() or 1,
                        help="busy-loop processes (default: one per core)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of `after`")
    parser.add_argument("--timeout", type=float, default=900.0, help="per run, seconds")
    parser.add_argument("--set", nargs="*", default=[], help="more KEY=VALUE overrides")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    first = range(1, 6)
    last = range(args.steps - 4, args.steps + 1)
    if last.start <= args.checkpoint:
        raise SystemExit("--steps must leave five steps after --checkpoint")
    runs = [("before", BEFORE_ENV)] + [(f"after{i + 1}", {}) for i in range(args.repeats)]
    rows = {}
    with tempfile.TemporaryDirectory() as root, \
            background_load(args.load, len(runs) * args.timeout + 60):
        for label, env in runs:
            times = train(label, env, args, Path(root))
            early, late = [times[s] for s in first], [times[s] for s in last]
            rows[label] = {"early_s": sum(early), "late_s": sum(late),
                           "ratio_sum": sum(early) / sum(late),
                           "ratio_median": statistics.median(early) / statistics.median(late),
                           "per_step_s": [round(times[s], 3) for s in sorted(times)]}
    print(f"{args.load} busy loops on {os.cpu_count()} cores; tiny.yaml, global batch "
          f"{args.global_batch}, checkpoint at step {args.checkpoint}")
    late_name = f"steps {last.start}-{last.stop - 1}"
    print(f"{'run':8s} {'steps 1-5 s':>12s} {late_name + ' s':>15s} {'ratio (sum)':>12s} "
          f"{'ratio (median step)':>20s}")
    for label, row in rows.items():
        print(f"{label:8s} {row['early_s']:12.2f} {row['late_s']:15.2f} "
              f"{row['ratio_sum']:11.2f}x {row['ratio_median']:19.2f}x")
    after = [row for label, row in rows.items() if label.startswith("after")]
    print(f"after, median over {len(after)} runs: ratio (sum) "
          f"{statistics.median(r['ratio_sum'] for r in after):.2f}x, ratio (median step) "
          f"{statistics.median(r['ratio_median'] for r in after):.2f}x; steps 1-5 after / "
          f"before {statistics.median(r['early_s'] for r in after) / rows['before']['early_s']:.3f}x")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
