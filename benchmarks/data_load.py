"""How long the default corpus takes to become training windows, and how fast batches come.

Baseline, measured in the same run: reading the corpus's files as raw bytes (the least any
loader must do). Prints the corpus size, `build_datasets` time and its ratio to the baseline,
peak memory, the time for `--procs N` processes loading at once (as `mtp train --nproc N`
workers do), and micro-batches per second for plain and packed (context-parallel) batches.

    python benchmarks/data_load.py [--procs 8] [--seq-length 64]
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtp_cli.config.schema import RunSpec
from mtp_cli.data import MicroBatchLoader, build_datasets
from mtp_cli.data.corpus import stdlib_files


def spec(seq_length: int) -> RunSpec:
    return RunSpec.model_validate({"model": {
        "vocab_size": 320, "hidden_size": 8, "num_layers": 1, "num_attention_heads": 2,
        "seq_length": seq_length}})


def timed_build(seq_length: int) -> float:
    start = time.perf_counter()
    build_datasets(spec(seq_length))
    return time.perf_counter() - start


def batches_per_second(loader: MicroBatchLoader, count: int = 2000) -> float:
    start = time.perf_counter()
    for _ in range(count):
        loader.next_batch()
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=64)
    args = parser.parse_args()

    start = time.perf_counter()
    files = stdlib_files()
    raw = sum(len(path.read_bytes()) for path in files)
    baseline = time.perf_counter() - start
    elapsed = timed_build(args.seq_length)
    train, val = build_datasets(spec(args.seq_length))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"default corpus: {len(files)} files, {raw / 1e6:.2f} MB; train "
          f"{train.num_tokens:,} tokens ({len(train):,} windows of {args.seq_length}), "
          f"val {val.num_tokens:,} tokens ({len(val):,} windows)")
    print(f"raw read (baseline) {baseline:.2f} s; build_datasets {elapsed:.2f} s "
          f"(x{elapsed / baseline:.1f} the baseline); peak RSS {peak_mb:.0f} MB (torch included)")

    context = multiprocessing.get_context("spawn")
    start = time.perf_counter()
    with context.Pool(args.procs) as pool:
        each = pool.map(timed_build, [args.seq_length] * args.procs)
    print(f"{args.procs} processes at once: slowest build {max(each):.2f} s, wall (with "
          f"interpreter start) {time.perf_counter() - start:.2f} s")

    common = dict(micro_batch_size=1, dp_rank=0, dp_size=1, seed=1)
    plain = batches_per_second(MicroBatchLoader(train, **{**common, "micro_batch_size": 8}))
    packed = batches_per_second(MicroBatchLoader(train, packed=True, **common))
    packed_cp = batches_per_second(MicroBatchLoader(train, packed=True, cp_rank=1, cp_size=2,
                                                    **common))
    print(f"micro-batches/s: plain (8 x {args.seq_length}) {plain:,.0f}; packed {packed:,.0f};"
          f" packed + CP2 shard {packed_cp:,.0f} (x{packed / packed_cp:.2f} slower than packed)")


if __name__ == "__main__":
    main()
