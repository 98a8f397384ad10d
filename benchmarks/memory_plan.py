"""The memory plan (`mtp build --memory`) against measured peaks, per pipeline rank, on CPU.

    python benchmarks/memory_plan.py                  # every case (~24 launches)
    python benchmarks/memory_plan.py --only tiny      # cases whose name contains "tiny"
    python benchmarks/memory_plan.py --json out.json

Each case launches its world of real processes (gloo, one per rank, a fresh interpreter each)
that build the training engine exactly as `mtp train` does (`build_engine`: DDP, FSDP2 or the
model-parallel engine with its pipeline schedule), take two optimizer steps on synthetic
batches and save a DCP checkpoint of the engine's state, as the trainer does. "Measured" is the peak of live tensor bytes over the run: c10's CPU allocator keeps a
running total of its live bytes (over every thread once `count_every_thread` switches it on),
and torch's profiler with `profile_memory=True` records it at every allocation; the highest is
the peak of live allocations (what the CUDA allocator's `max_memory_allocated` is on a GPU). The resident-set high-water mark (VmHWM) is shown beside
it: it includes the interpreter, torch's libraries and malloc's retained pages, so it cannot
resolve small models. The plan is `plan_memory(..., device="cpu")` (the per-tensor AdamW path
torch takes on CPU); a pipeline rank's measured figure is the highest over its ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20

TINY = "specs/tiny.yaml"
GPT = "specs/gpt_125m.yaml"
MOE = "specs/tiny_moe.yaml"
GPT_SMALL = ["model.seq_length=256", "train.micro_batch_size=1"]
# (name, spec, world size, overrides); global batch sizes keep >= 2 micro-batches per rank
CASES: list[tuple[str, str, int, list[str]]] = [
    ("tiny DP1 D=2", TINY, 1, []),
    ("tiny DP1 D=0", TINY, 1, ["mtp.num_layers=0"]),
    ("tiny DP1 D=3 full", TINY, 1, ["mtp.num_layers=3", "train.recompute=full"]),
    ("tiny DP1 D=3 chunked", TINY, 1, ["mtp.num_layers=3", "train.loss.chunked=true"]),
    ("tiny TP2 D=3", TINY, 2, ["mtp.num_layers=3", "parallel.tensor=2"]),
    ("tiny PP2 D=3", TINY, 2, ["mtp.num_layers=3", "parallel.pipeline=2"]),
    ("tiny PP2xVPP2 D=3", TINY, 2, ["mtp.num_layers=3", "parallel.pipeline=2",
                                    "parallel.virtual_pipeline=2"]),
    ("tiny FSDP2 DP2 D=3", TINY, 2, ["mtp.num_layers=3", "parallel.fsdp=true"]),
    ("tiny_moe EP2 D=2", MOE, 2, ["parallel.expert=2"]),
    ("tiny_moe PP2xEP2 D=2", MOE, 4, ["parallel.expert=2", "parallel.pipeline=2"]),
    ("125m DP1 D=0", GPT, 1, [*GPT_SMALL, "train.global_batch_size=2", "mtp.num_layers=0"]),
    ("125m DP1 D=3", GPT, 1, [*GPT_SMALL, "train.global_batch_size=2", "mtp.num_layers=3",
                              "train.loss.chunked=false"]),
    ("125m DP1 D=3 chunked", GPT, 1, [*GPT_SMALL, "train.global_batch_size=2",
                                      "mtp.num_layers=3", "train.loss.chunked=true"]),
    ("125m DP1 D=3 full", GPT, 1, [*GPT_SMALL, "train.global_batch_size=2", "mtp.num_layers=3",
                                   "train.recompute=full", "train.loss.chunked=false"]),
    ("125m DP1 D=3 fp32", GPT, 1, [*GPT_SMALL, "train.global_batch_size=2", "mtp.num_layers=3",
                                   "train.bf16=false", "train.loss.chunked=false"]),
    ("125m TP2 D=3", GPT, 2, [*GPT_SMALL, "train.global_batch_size=2", "mtp.num_layers=3",
                              "parallel.tensor=2", "train.loss.chunked=false"]),
    ("125m PP2 D=3", GPT, 2, [*GPT_SMALL, "train.global_batch_size=4", "mtp.num_layers=3",
                              "parallel.pipeline=2", "train.loss.chunked=false"]),
    ("125m PP2xVPP2 D=3", GPT, 2, [*GPT_SMALL, "train.global_batch_size=4", "mtp.num_layers=3",
                                   "parallel.pipeline=2", "parallel.virtual_pipeline=2",
                                   "train.loss.chunked=false"]),
    ("125m PP2 D=0 full", GPT, 2, [*GPT_SMALL, "train.global_batch_size=4", "mtp.num_layers=0",
                                   "parallel.pipeline=2", "train.recompute=full"]),
    ("tiny TP2xDP2 D=3", TINY, 4, ["mtp.num_layers=3", "parallel.tensor=2"]),
    ("tiny FSDP2xTP2 DP2 D=3", TINY, 4, ["mtp.num_layers=3", "parallel.tensor=2",
                                         "parallel.fsdp=true"]),
    ("125m FSDP2 DP2 D=3", GPT, 2, [*GPT_SMALL, "train.global_batch_size=4", "mtp.num_layers=3",
                                    "parallel.fsdp=true", "train.loss.chunked=false"]),
]


# --- one worker process ----------------------------------------------------------------------------


def worker(spec_path: str, overrides: list[str], steps: int, checkpoint: str) -> dict:
    """One rank: build the engine as `mtp train` does, take `steps` steps and save a checkpoint
    to `checkpoint`, measuring the peak."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from mtp_cli.config.loader import load_spec
    from mtp_cli.launch.dry_run import synthetic_batches
    from mtp_cli.launch.memory_probe import measure_peak
    from mtp_cli.parallel.mesh import build_mesh
    from mtp_cli.plan.dims import ParallelDims
    from mtp_cli.train.engine import build_engine
    from mtp_cli.train.step import StepSettings

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    spec = load_spec(REPO_ROOT / spec_path, overrides)
    dims = ParallelDims.from_spec(spec, world)
    mesh = build_mesh(dims, "cpu")
    count = dims.num_microbatches(spec)
    settings = StepSettings(
        num_microbatches=count, per_token_loss=spec.train.calculate_per_token_loss,
        grad_clip=spec.train.grad_clip, bf16=spec.train.bf16, device=torch.device("cpu"),
        dp_cp_size=dims.dp_cp, dp_cp_group=mesh.dp_cp_group if dims.dp_cp > 1 else None)
    torch.manual_seed(spec.train.seed)
    # c10's total counts every live byte, so a second block's peak is still the absolute one
    with measure_peak(torch.device("cpu")) as build:
        engine = build_engine(spec, mesh, settings)
    with measure_peak(torch.device("cpu")) as memory:
        for step in range(steps):
            engine.train_step(synthetic_batches(spec, count, 1000 * step + mesh.dp_rank))
        model_sd, optim_sd = engine.state_dicts()  # a checkpoint, as the trainer saves one
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=checkpoint)
        del model_sd, optim_sd
    pp_rank = mesh.mesh.get_local_rank("pp")
    result = {"rank": rank, "pp_rank": pp_rank, "peak": max(build.peak, memory.peak),
              "build_peak": build.peak, "rss_peak": memory.rss_peak}
    dist.destroy_process_group()
    return result


# --- the driver ------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(spec_path: str, world: int, overrides: list[str], steps: int) -> list[dict]:
    """`world` fresh processes on gloo; their results."""
    with tempfile.TemporaryDirectory(prefix="mtp-memory-plan-") as checkpoint:
        return _launch(spec_path, world, overrides, steps, checkpoint)


def _launch(spec_path: str, world: int, overrides: list[str], steps: int,
            checkpoint: str) -> list[dict]:
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)}
        payload = json.dumps({"spec": spec_path, "overrides": overrides, "steps": steps,
                              "checkpoint": checkpoint})
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", payload], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"{spec_path} {overrides} failed:\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def planned(spec_path: str, world: int, overrides: list[str]) -> dict[int, tuple[float, float]]:
    """(total, build phase) per pipeline rank."""
    sys.path.insert(0, str(REPO_ROOT))
    from mtp_cli.config.loader import load_spec
    from mtp_cli.facts.stage_tensors import build_memory_plan

    plan = build_memory_plan(load_spec(REPO_ROOT / spec_path, overrides), world, device="cpu")
    return {rank.pp_rank: (rank.total, rank.phases["build"]) for rank in plan.ranks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="run the cases whose name contains this")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(worker(job["spec"], job["overrides"], job["steps"], job["checkpoint"])))
        return
    print(f"{os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}; plan vs measured peak of "
          f"live tensor bytes (torch profiler), per pipeline rank", flush=True)
    head = (f"{'case':<22} {'pp':>2} | {'plan MiB':>9} {'measured':>9} {'plan/meas':>9} | "
            f"{'build pl':>8} {'build ms':>8} {'ratio':>6} | {'RSS peak':>9}")
    print(head)
    print("-" * len(head))
    rows = []
    for name, spec_path, world, overrides in CASES:
        if args.only and args.only not in name:
            continue
        started = time.perf_counter()
        results = launch(spec_path, world, overrides, args.steps)
        plan = planned(spec_path, world, overrides)
        for pp_rank in sorted(plan):
            mine = [r for r in results if r["pp_rank"] == pp_rank]
            measured = max(r["peak"] for r in mine)
            build = max(r["build_peak"] for r in mine)
            rss = max(r["rss_peak"] for r in mine)
            total, build_plan = plan[pp_rank]
            ratio = total / measured
            rows.append({"case": name, "pp_rank": pp_rank, "plan": total,
                         "measured": measured, "rss_peak": rss, "ratio": ratio,
                         "build_plan": build_plan, "build_measured": build,
                         "seconds": time.perf_counter() - started})
            flag = "" if abs(ratio - 1) <= 0.15 else "  <-- off by more than 15%"
            print(f"{name:<22} {pp_rank:>2} | {total / MIB:9.1f} {measured / MIB:9.1f} "
                  f"{ratio:9.3f} | {build_plan / MIB:8.1f} {build / MIB:8.1f} "
                  f"{build_plan / build:6.2f} | {rss / MIB:9.0f}{flag}", flush=True)
    within = sum(abs(r["ratio"] - 1) <= 0.15 for r in rows)
    print(f"{within}/{len(rows)} within 15%")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
