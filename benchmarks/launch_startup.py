"""What a `mtp train` launch costs on the CPU with forked workers against exec'd ones.

    python benchmarks/launch_startup.py                 # --nproc 1 2 4, 3 rounds
    python benchmarks/launch_startup.py --nproc 2 --rounds 5

Each launch trains a tiny model for 2 steps (so start-up dominates) with `--start-method fork`
and `--start-method exec` in turn (A B A B: a drift of the machine's speed hits both alike), and
the figures are the medians of the wall time and of the CPU time of the launch and all its
workers (user + sys, from the kernel's accounting of finished children). The ratio fork / exec
is what forking saves; on a machine with fewer cores than workers the CPU time is what a job's
start-up waits for.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.ffn_hidden_size=64", "model.seq_length=32",
        "train.steps=2", "train.micro_batch_size=1", "train.global_batch_size=4",
        "train.eval_interval=0", "checkpoint.interval=0"]


def launch(method: str, nproc: int, corpus: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the launcher and its workers) of one launch."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        done = subprocess.run(
            [sys.executable, "-m", "mtp_cli", "train", "specs/tiny.yaml", *TINY,
             f"data.path={corpus}", "--run-dir", f"{run_dir}/run", "--nproc", str(nproc),
             "--start-method", method],
            cwd=REPO_ROOT, capture_output=True, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{method} --nproc {nproc} failed:\n{done.stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    corpus = REPO_ROOT / "mtp_cli"  # the package's own sources: text, always there
    rows = []
    print(f"{'nproc':>5} {'exec wall':>10} {'fork wall':>10} {'ratio':>6} "
          f"{'exec cpu':>9} {'fork cpu':>9} {'ratio':>6}")
    for nproc in args.nproc:
        times: dict[str, list[tuple[float, float]]] = {"exec": [], "fork": []}
        launch("fork", nproc, corpus)  # warm the page cache for both
        for _ in range(args.rounds):
            for method in ("exec", "fork"):
                times[method].append(launch(method, nproc, corpus))
        med = {m: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t))
               for m, t in times.items()}
        row = {"nproc": nproc, "exec_wall_s": med["exec"][0], "fork_wall_s": med["fork"][0],
               "exec_cpu_s": med["exec"][1], "fork_cpu_s": med["fork"][1]}
        rows.append(row)
        print(f"{nproc:>5} {row['exec_wall_s']:>9.2f}s {row['fork_wall_s']:>9.2f}s "
              f"{row['fork_wall_s'] / row['exec_wall_s']:>6.2f} {row['exec_cpu_s']:>8.2f}s "
              f"{row['fork_cpu_s']:>8.2f}s {row['fork_cpu_s'] / row['exec_cpu_s']:>6.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
