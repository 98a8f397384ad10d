"""A training start's resident memory and start-up time on a large Megatron `.bin`/`.idx` corpus.

Generates a corpus of random uint16 tokens (documents of 200..3000 tokens, written in chunks)
under --dir, then times `mtp train` (one process, 2 steps of a tiny model, vocab 65536) on it,
cold (no index cache) and warm, and on a 2 MiB corpus of the same kind: each rank's RSS growth
from the corpus is the peak RSS on the big corpus minus that on the small one. With --old TREE
(a worktree of the commit before memory mapping, e.g. `git worktree add /tmp/wt-old fd99f79`),
the same start on a --old-size-mb corpus with that tree's code (it reads the whole `.bin` into
memory, so it is measured on a smaller file). The corpus is deleted afterwards unless --keep.

    python benchmarks/data_memory.py [--size-gb 2] [--old /tmp/wt-old --old-size-mb 512]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 1 << 26  # tokens per write: 128 MiB of uint16
SPEC = """model: {vocab_size: 65536, hidden_size: 16, num_layers: 1, num_attention_heads: 2,
        seq_length: 128}
train: {steps: 2, micro_batch_size: 1, global_batch_size: 1, eval_interval: 0}
checkpoint: {interval: 0}
logging: {tensorboard: false}
data: {path: PATH}
"""


def generate(prefix: Path, num_bytes: int, seed: int = 0) -> None:
    """`prefix.bin` of `num_bytes` random uint16 tokens and its `prefix.idx` (version 1)."""
    generator = torch.Generator().manual_seed(seed)
    total = num_bytes // 2
    lengths = torch.randint(200, 3001, (total // 200 + 1,), generator=generator)
    ends = lengths.cumsum(0)
    count = int(torch.searchsorted(ends, total)) + 1
    lengths = lengths[:count].clone()
    lengths[-1] -= int(ends[count - 1]) - total
    with open(prefix.with_suffix(".bin"), "wb") as handle:
        for start in range(0, total, CHUNK):
            piece = torch.randint(0, 65536, (min(CHUNK, total - start),), generator=generator)
            handle.write(piece.to(torch.int16).numpy().tobytes())  # the same 16 bits
    pointers = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)[:-1] * 2])
    with open(prefix.with_suffix(".idx"), "wb") as handle:
        handle.write(struct.pack("<9sQBQQ", b"MMIDIDX\x00\x00", 1, 8, count, count + 1))
        handle.write(lengths.to(torch.int32).numpy().tobytes())
        handle.write(pointers.numpy().tobytes())
        handle.write(torch.arange(count + 1, dtype=torch.int64).numpy().tobytes())


def train_start(tree: Path, prefix: Path, run_dir: Path) -> tuple[float, float]:
    """(peak RSS MiB of the largest process, wall seconds) of a 2-step `mtp train`."""
    spec = run_dir.with_suffix(".yaml")
    spec.write_text(SPEC.replace("PATH", str(prefix)))
    shutil.rmtree(run_dir, ignore_errors=True)
    code = ("import resource, subprocess, sys, time; start = time.perf_counter(); "
            "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
            "print(time.perf_counter() - start, "
            "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")
    command = [sys.executable, "-c", code, sys.executable, "-m", "mtp_cli", "train", str(spec),
               "--run-dir", str(run_dir), "--overwrite"]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env, cwd=tree)
    wall, peak = (float(x) for x in out.stdout.split()[-2:])
    return peak, wall


def data_start(tree: Path, spec: Path) -> float:
    """Seconds `build_datasets` takes in a fresh process (the data part of a start)."""
    code = ("import sys, time; from mtp_cli.config.loader import load_spec; "
            "from mtp_cli.data import build_datasets; spec = load_spec(sys.argv[1]); "
            "start = time.perf_counter(); build_datasets(spec); "
            "print(time.perf_counter() - start)")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", code, str(spec)], check=True,  # cwd: sys.path[0]
                         capture_output=True, text=True, env=env, cwd=tree)
    return float(out.stdout.split()[-1])


def measure(label: str, tree: Path, prefix: Path, base_rss: float, work: Path) -> None:
    """One line: build_datasets cold (no index cache) and warm, then a training start's peak."""
    spec = (work / "run").with_suffix(".yaml")
    spec.write_text(SPEC.replace("PATH", str(prefix)))
    shutil.rmtree(prefix.parent / ".mtp_index_cache", ignore_errors=True)
    cold, warm = data_start(tree, spec), data_start(tree, spec)
    peak, wall = train_start(tree, prefix, work / "run")
    size = prefix.with_suffix(".bin").stat().st_size / 2**20
    print(f"{label:<10} .bin {size:>6,.0f} MiB: peak RSS {peak:>6,.0f} MiB "
          f"(+{peak - base_rss:,.0f} MiB from the corpus); build_datasets cold {cold:5.2f} s, "
          f"warm {warm:5.2f} s; start + 2 steps {wall:5.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=2.0)
    parser.add_argument("--old", type=Path, help="worktree of the in-memory reader (fd99f79)")
    parser.add_argument("--old-size-mb", type=int, default=512)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/mtp_data_memory"))
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    work = args.dir
    work.mkdir(parents=True, exist_ok=True)
    try:
        small, big = work / "small", work / "big"
        generate(small, 2 << 20, seed=1)
        start = time.perf_counter()
        generate(big, int(args.size_gb * 2**30), seed=2)
        print(f"generated {args.size_gb:g} GiB in {time.perf_counter() - start:.0f} s")
        base, _ = train_start(ROOT, small, work / "run")
        print(f"{'mmap':<10} .bin      2 MiB: peak RSS {base:>6,.0f} MiB (the base)")
        measure("mmap", ROOT, big, base, work)
        if args.old is not None:
            old_small, old_big = work / "old_small", work / "old_big"
            generate(old_small, 2 << 20, seed=1)
            generate(old_big, args.old_size_mb << 20, seed=3)
            old_base, _ = train_start(args.old, old_small, work / "run")
            print(f"{'in memory':<10} .bin      2 MiB: peak RSS {old_base:>6,.0f} MiB (the base)")
            measure("in memory", args.old, old_big, old_base, work)
        print(f"(this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} "
              "MiB peak while generating)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
