"""A rank's peak memory while building its model and while saving a checkpoint, above its steady
training state, as a fraction of the full model + optimizer bytes, at TP1 / TP2 / TP4.

    python benchmarks/sharded_state_memory.py                       # gpt_125m, TP 1 2 4, CPU
    python benchmarks/sharded_state_memory.py --tp 4 --json out.json

Each tensor-parallel size runs in fresh gloo processes (one per TP rank). On every rank:

* steady state: after construction, zero gradients and one AdamW step, so parameters,
  gradients and both moments are live (what every later step holds);
* construction: the training engine (`TrainingEngine`: stages built with parameters on the meta
  device, only this rank's shards materialised) - its peak minus the steady state, both from
  the memory before it (negative: construction never rises above the steady state);
* save: the engine's checkpoint state (each rank's own shards) written with DCP - peak above the
  steady state;
* baselines measured in the same run, the way the engine worked before: construction of the
  whole stage on the device then sliced for TP, and a save that gathers every TP-sharded
  parameter and moment to full size first.

Figures are the largest over ranks (max over ranks of each rank's own difference), divided by the full (single-process) model's fp32
parameters + two Adam moments, in bytes. CPU: resident set high-water mark (`VmHWM`, reset by
writing 5 to /proc/self/clear_refs) with glibc's mmap threshold at 64 KiB so freed tensors leave
the resident set at once; CUDA (`--device cuda`, nccl): allocator statistics.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _worker(rank: int, world: int, init_file: str, spec_path: str, device: str,
            out_dir: str) -> None:
    import torch
    import torch.distributed as dist
    from mtp_memory import _Memory

    torch.set_num_threads(1)
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    from mtp_cli import build_model, load_spec
    from mtp_cli.checkpoint.disk_full import save_state
    from mtp_cli.parallel.mesh import build_mesh
    from mtp_cli.parallel.tensor_parallel import parallelize_tensor, tensor_parallel_plan
    from mtp_cli.plan.dims import ParallelDims
    from mtp_cli.train.engine import TrainingEngine
    from mtp_cli.train.step import StepSettings

    spec = load_spec(spec_path, [f"parallel.tensor={world}", "train.bf16=false",
                                 f"train.global_batch_size={spec_batch(world)}",
                                 "train.micro_batch_size=1"])
    dims = ParallelDims.from_spec(spec, world)
    mesh = build_mesh(dims, device)
    dev = torch.device(device, rank) if device == "cuda" else torch.device("cpu")
    settings = StepSettings(num_microbatches=1, per_token_loss=False, grad_clip=1.0, bf16=False,
                            device=dev, dp_cp_size=1, dp_cp_group=None)
    memory = _Memory(device)
    result: dict[str, float] = {}

    def peak_above(base: int) -> int:
        memory.sync()
        return memory.peak() - base

    # the old construction: the whole stage on the device, then sliced
    gc.collect()
    memory.sync()
    base = memory.current()
    memory.reset_peak()
    old = build_model(spec, dev)
    if world > 1:
        parallelize_tensor(old, mesh.group("tp"))
    old_peak = peak_above(base)
    del old
    gc.collect()

    memory.sync()
    base = memory.current()
    memory.reset_peak()
    engine = TrainingEngine(spec, mesh, settings)
    new_peak = peak_above(base)
    chunk = engine.chunks[0]
    for param in chunk.parameters():
        param.grad = torch.zeros_like(param)
    engine.optimizer.step()  # both moments live: the steady state
    gc.collect()
    memory.sync()
    steady = memory.current() - base
    # above the steady state (parameters, gradients, moments); negative: never above it
    result["construction"] = new_peak - steady
    result["construction_whole_then_slice"] = old_peak - steady

    directory = Path(out_dir) / f"ckpt_tp{world}"
    memory.sync()
    base = memory.current()
    memory.reset_peak()
    model_sd, optim_sd = engine.state_dicts()
    save_state({"model": model_sd, "optimizer": optim_sd}, directory / "sharded")
    result["save"] = peak_above(base)
    del model_sd, optim_sd
    gc.collect()

    # the old save: every TP shard and moment gathered to full size first
    plan = tensor_parallel_plan(chunk)
    memory.sync()
    base = memory.current()
    memory.reset_peak()
    full = {}
    for name, param in chunk.named_parameters():
        full[f"model.{name}"] = plan.gather_like_parameter(name, param.detach()) \
            if plan is not None else param.detach()
        for item, value in engine.optimizer.state[param].items():
            if value.dim() > 0:
                full[f"optimizer.{name}.{item}"] = plan.gather_like_parameter(name, value) \
                    if plan is not None else value
    save_state(full, directory / "gathered")
    result["save_gathered"] = peak_above(base)
    del full

    totals = torch.tensor([result[k] for k in sorted(result)], dtype=torch.float64)
    dist.all_reduce(totals, op=dist.ReduceOp.MAX)
    if rank == 0:
        merged = dict(zip(sorted(result), totals.tolist(), strict=True))
        (Path(out_dir) / f"tp{world}.json").write_text(json.dumps(merged))
    dist.barrier()
    dist.destroy_process_group()


def spec_batch(world: int) -> int:
    return 1  # data parallel 1 at every TP size


def full_bytes(spec_path: str) -> int:
    """fp32 parameters + two Adam moments of the single-process model."""
    from mtp_cli import build_model, load_spec

    model = build_model(load_spec(spec_path), "meta")
    return 3 * 4 * sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", default=str(REPO_ROOT / "specs" / "gpt_125m.yaml"))
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # freed tensors leave the resident set
    import torch.multiprocessing as mp

    total = full_bytes(args.spec)
    print(f"{Path(args.spec).name}: full model + AdamW state = {total / 2**20:.0f} MiB (fp32)")
    print(f"{'TP':>3} {'construction':>13} {'(whole, sliced)':>16} {'save':>7} "
          f"{'(gathered)':>11}   x full model + optimizer, per rank, above steady state")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for tp in args.tp:
            mp.spawn(_worker, args=(tp, os.path.join(tmp, f"rdzv{tp}"), args.spec, args.device,
                                    tmp), nprocs=tp, join=True)
            row = json.loads((Path(tmp) / f"tp{tp}.json").read_text())
            rows[tp] = {k: v / total for k, v in row.items()}
            r = rows[tp]
            print(f"{tp:>3} {r['construction']:>12.3f}x {r['construction_whole_then_slice']:>15.3f}x "
                  f"{r['save']:>6.3f}x {r['save_gathered']:>10.3f}x")
    if args.json:
        args.json.write_text(json.dumps({"full_bytes": total, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
