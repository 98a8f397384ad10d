"""A rank's peak memory while the training engine builds its stage under expert parallel, as a
fraction of the whole model's fp32 parameter bytes, at EP 1 / 2 / 4 / 8.

    python benchmarks/expert_build_memory.py               # a 32-expert MoE, EP 1 2 4 8
    python benchmarks/expert_build_memory.py --ep 4 --json out.json

Each measurement runs in a fresh interpreter as global rank 0 of an EP-sized world joined by
torch's fake process group (construction runs no collective), with glibc's mmap threshold at
64 KiB so a freed tensor leaves the resident set at once; the figure is the resident-set
high-water mark (`VmHWM`, reset by writing 5 to /proc/self/clear_refs) above the memory before
construction. Two ways, measured in the same run:

* `engine`: `build_engine`, as `mtp train` builds it: parameters on the meta device, the other
  ranks' experts dropped there, only this rank's weights materialised;
* `before` (the baseline, how the engine worked before): the stage materialised with every
  routed expert, then the other ranks' experts dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
OVERRIDES = ["model.hidden_size=256", "model.num_moe_experts=32", "model.moe_ffn_hidden_size=256",
             "model.ffn_hidden_size=512", "model.seq_length=32", "mtp.num_layers=1",
             "train.micro_batch_size=1", "train.global_batch_size=8"]


def _hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def measure(ep: int, way: str) -> dict:
    """In this (fresh) process: construction's peak above the memory before it, in bytes."""
    sys.path.insert(0, str(REPO_ROOT))
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from mtp_cli import build_model, load_spec
    from mtp_cli.parallel.expert_parallel import (
        apply_expert_parallel,
        is_expert_parameter,
    )
    from mtp_cli.parallel.mesh import build_mesh
    from mtp_cli.parallel.meta_init import materialize, parameters_on_meta
    from mtp_cli.plan.dims import ParallelDims
    from mtp_cli.train.engine import build_engine
    from mtp_cli.train.step import StepSettings

    torch.set_num_threads(1)
    spec = load_spec(REPO_ROOT / "specs" / "tiny_moe.yaml", [*OVERRIDES, f"parallel.expert={ep}"])
    dims = ParallelDims.from_spec(spec, ep)
    dist.init_process_group("fake", rank=0, world_size=ep, store=FakeStore())
    mesh = build_mesh(dims, "cpu")
    settings = StepSettings(
        num_microbatches=dims.num_microbatches(spec), per_token_loss=False, grad_clip=1.0,
        bf16=False, device=torch.device("cpu"), dp_cp_size=dims.dp_cp,
        dp_cp_group=mesh.dp_cp_group if dims.dp_cp > 1 else None)
    whole = build_model(spec, "meta")  # imports and lazy initialisation, outside the figure
    full = sum(p.numel() * 4 for p in whole.parameters())
    experts = sum(p.numel() * 4 for n, p in whole.named_parameters() if is_expert_parameter(n))
    before = _rss_bytes()
    Path("/proc/self/clear_refs").write_text("5")
    if way == "engine":
        model = build_engine(spec, mesh, settings).chunks[0]
    else:  # the former order: everything materialised, then the other experts dropped
        with parameters_on_meta():
            model = build_model(spec, "cpu", initialize=False)
        materialize(model, spec, torch.device("cpu"))
        if ep > 1:
            apply_expert_parallel(model, mesh.expert_groups(ep))
    peak = _hwm_bytes() - before
    kept = sum(p.numel() * 4 for p in model.parameters())
    dist.destroy_process_group()
    return {"ep": ep, "way": way, "peak_bytes": peak, "kept_bytes": kept, "full_bytes": full,
            "expert_bytes": experts}


def _run(ep: int, way: str) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, __file__, "--one", str(ep), way], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ep", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(int(args.one[0]), args.one[1])))
        return
    rows = []
    print(f"{'EP':>3} {'kept MiB':>9} {'engine peak':>12} {'before peak':>12} "
          f"{'engine/full':>12} {'before/full':>12} {'engine/before':>14}")
    for ep in args.ep:
        engine, before = _run(ep, "engine"), _run(ep, "before")
        full = engine["full_bytes"]
        row = {"ep": ep, "kept_bytes": engine["kept_bytes"], "full_bytes": full,
               "expert_bytes": engine["expert_bytes"], "engine_peak_bytes": engine["peak_bytes"],
               "before_peak_bytes": before["peak_bytes"]}
        rows.append(row)
        print(f"{ep:>3} {engine['kept_bytes'] / MIB:>9.1f} {engine['peak_bytes'] / MIB:>10.1f}Mi"
              f" {before['peak_bytes'] / MIB:>10.1f}Mi {engine['peak_bytes'] / full:>12.2f}"
              f" {before['peak_bytes'] / full:>12.2f}"
              f" {engine['peak_bytes'] / before['peak_bytes']:>14.2f}")
    print(f"full model {rows[0]['full_bytes'] / MIB:.1f} MiB fp32, routed experts "
          f"{rows[0]['expert_bytes'] / rows[0]['full_bytes']:.0%} of it")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
