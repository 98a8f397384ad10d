"""`mtp train`: check everything that can be checked, then start the job with torch.distributed's
own elastic launcher (`torch.distributed.run`, in this process).

Nothing is launched, created or written until the spec, the parallel sizes, the data and the
run directory have passed: bad input exits 2 and leaves nothing behind. The launcher then holds
a lock on the run directory for the whole job and starts one worker per device
(`python -m mtp_cli.launch.worker`); the workers die with it.

Rendezvous: a standalone one (localhost, free port) for a single node; c10d at
`--rdzv-endpoint` by default for several (every node runs `mtp train` with the same arguments,
and the rendezvous assigns node ranks); `--rdzv-backend static` uses `--node-rank` instead.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mtp_cli.config.schema import RunSpec
from mtp_cli.errors import Problem, UserError
from mtp_cli.launch.distributed import LAUNCHER_PID_ENV
from mtp_cli.plan.dims import ParallelDims
from mtp_cli.run_dir import RunDir, RunDirLock, check_creatable, read_meta

WORKER_MODULE = "mtp_cli.launch.worker"
USER_ERROR_EXIT = 2


@dataclass
class LaunchOptions:
    """The `mtp train` flags besides the spec."""

    run_dir: Path
    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    rdzv_backend: str = "c10d"
    rdzv_id: str | None = None
    max_restarts: int = 0
    overwrite: bool = False
    allow_imports: bool = False

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes


def default_run_dir(spec_path: Path) -> Path:
    """`runs/<spec file stem>`, relative to the current directory."""
    return Path("runs") / spec_path.stem


@dataclass
class LaunchPlan:
    """The outcome of the checks: what the launch will do."""

    dims: ParallelDims
    run_dir: RunDir
    resume_step: int | None  # None: a fresh start
    finished: bool


def check_options(options: LaunchOptions) -> None:
    """Flag combinations that cannot work."""
    problems = []
    if options.nproc < 1 or options.nnodes < 1:
        problems.append(Problem("--nproc and --nnodes must be at least 1"))
    if not 0 <= options.node_rank < max(options.nnodes, 1):
        problems.append(Problem(f"--node-rank {options.node_rank} is not in [0, --nnodes)"))
    if options.max_restarts < 0:
        problems.append(Problem("--max-restarts must be >= 0"))
    if options.nnodes > 1 and not options.rdzv_endpoint:
        problems.append(Problem("--nnodes > 1 needs --rdzv-endpoint HOST:PORT "
                                "(the same on every node)"))
    if problems:
        raise UserError(problems=problems)


def check_resume(spec: RunSpec, run_dir: RunDir, options: LaunchOptions) -> tuple[int | None, bool]:
    """The step a resume starts from (None: fresh) and whether the run is already finished."""
    if options.overwrite:
        return None, False
    latest = run_dir.latest_checkpoint()
    if latest is None:
        return None, False
    try:
        meta = read_meta(latest)
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(problems=[Problem(f"cannot read {latest / 'meta.json'}: {error}",
                                          hint="--overwrite starts afresh")]) from None
    stored = meta.get("spec", {})
    current = spec.model_dump(mode="json")
    for section, key in (("model", None), ("mtp", "num_layers"), ("mtp", "use_repeated_layer")):
        old = stored.get(section, {}) if key is None else stored.get(section, {}).get(key)
        new = current[section] if key is None else current[section][key]
        if old != new:
            where = section if key is None else f"{section}.{key}"
            raise UserError(problems=[Problem(
                f"{where} differs from the checkpoint in {latest}", key=where,
                hint="pass --overwrite to start afresh, or another --run-dir")])
    old_batch = stored.get("train", {}).get("global_batch_size")
    if old_batch != spec.train.global_batch_size:
        raise UserError(problems=[Problem(
            f"the checkpoint {latest.name} was trained with global batches of {old_batch}; "
            f"its data position cannot move to {spec.train.global_batch_size}",
            key="train.global_batch_size", hint="keep the batch size, or --overwrite")])
    step = int(meta["step"])
    return step, step >= spec.train.steps


def plan_launch(spec: RunSpec, options: LaunchOptions) -> LaunchPlan:
    """Every check that needs no process group; raises `UserError`; creates nothing."""
    from mtp_cli.data import build_datasets

    check_options(options)
    dims = ParallelDims.from_spec(spec, options.world_size)
    dims.check_supported(spec)
    _, val_set = build_datasets(spec)
    if spec.train.eval_interval and len(val_set) == 0:
        raise UserError(problems=[Problem(
            "the validation split is empty", key="data.val_fraction",
            hint="raise data.val_fraction, or set train.eval_interval=0")])
    run_dir = RunDir(options.run_dir)
    check_creatable(run_dir.root)
    resume_step, finished = check_resume(spec, run_dir, options)
    return LaunchPlan(dims=dims, run_dir=run_dir, resume_step=resume_step, finished=finished)


def torchrun_argv(spec: RunSpec, options: LaunchOptions, run_dir: RunDir) -> list[str]:
    """The `torch.distributed.run` command line that starts the workers."""
    argv = [f"--nproc-per-node={options.nproc}", f"--nnodes={options.nnodes}",
            f"--max-restarts={options.max_restarts}"]
    if options.nnodes == 1 and not options.rdzv_endpoint:
        argv.append("--standalone")
    else:
        argv += [f"--rdzv-backend={options.rdzv_backend}",
                 f"--rdzv-endpoint={options.rdzv_endpoint}",
                 f"--rdzv-id={options.rdzv_id or 'mtp-' + run_dir.root.resolve().name}",
                 f"--node-rank={options.node_rank}"]
    argv += ["--module", WORKER_MODULE, "--run-dir", str(run_dir.root.resolve()),
             "--spec", json.dumps(spec.model_dump(mode="json"))]
    if options.allow_imports:
        argv.append("--allow-imports")
    return argv


def _run_workers(argv: list[str]) -> int:
    """Run torch.distributed.run in this process; map its failures to exit codes."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except ChildFailedError as error:
        codes = {failure.exitcode for failure in error.failures.values()}
        if codes == {USER_ERROR_EXIT}:
            return USER_ERROR_EXIT  # the worker printed its message
        print(error.format_msg(), file=sys.stderr, flush=True)
        return 1
    except SignalException as error:
        print(f"mtp train: stopped by {signal.Signals(error.sigval).name}", file=sys.stderr,
              flush=True)
        return 128 + int(error.sigval)
    return 0


def launch(spec: RunSpec, options: LaunchOptions, *, echo: Callable[[str], None] = print) -> int:
    """Check, then train; returns the process exit code (0 also for an already finished run)."""
    plan = plan_launch(spec, options)
    run_dir = plan.run_dir
    if plan.finished:
        echo(f"{run_dir.root}: already finished (step {plan.resume_step} of "
             f"train.steps {spec.train.steps}); nothing to do (--overwrite starts afresh)")
        return 0
    created = not run_dir.root.exists()
    run_dir.root.mkdir(parents=True, exist_ok=True)
    lock = RunDirLock(run_dir, shared=options.nnodes > 1)
    try:
        lock.acquire()
    except UserError:
        if created:
            run_dir.root.rmdir()
        raise
    try:
        if options.overwrite:
            run_dir.clear()
        if plan.resume_step is not None:
            echo(f"{run_dir.root}: resuming from step {plan.resume_step}")
        os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
        # The c10d rendezvous shares its TCPStore with the workers' process group by default,
        # and a restarted group then reads the dead group's gloo/nccl addresses from it
        # (pytorch/pytorch#135712): give every attempt its own store instead.
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
        if "OMP_NUM_THREADS" not in os.environ and options.nproc > 1:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
                os.cpu_count() or 1)
            os.environ["OMP_NUM_THREADS"] = str(max(1, cores // options.nproc))
        sys.stdout.flush()
        return _run_workers(torchrun_argv(spec, options, run_dir))
    finally:
        lock.release()
