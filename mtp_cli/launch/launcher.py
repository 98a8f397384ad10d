"""`mtp train`: check everything that can be checked, then start the job with torch.distributed's
own elastic launcher (`torch.distributed.run`, in this process).

Nothing is launched, created or written until the spec, the parallel sizes, the data and the
run directory have passed: bad input exits 2 and leaves nothing behind. The launcher then holds
a lock on the run directory for the whole job and starts one worker per device
(`mtp_cli.launch.worker`, forked or in its own interpreter: `launch/start.py`); the workers die
with it.

Rendezvous: a standalone one (localhost, free port) for a single node; c10d at
`--rdzv-endpoint` by default for several (every node runs `mtp train` with the same arguments,
and the rendezvous assigns node ranks); `--rdzv-backend static` uses `--node-rank` instead.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mtp_cli.checkpoint.run_dir import RunDir, RunDirLock, check_creatable
from mtp_cli.config.schema import RunSpec
from mtp_cli.errors import Problem, UserError
from mtp_cli.launch.banner import (
    DataSummary,
    blend_fractions,
    data_summary,
    meta_model,
    overwrite_summary,
    start_banner,
)
from mtp_cli.launch.checks import check_backend, check_rendezvous, check_run_dir_entries
from mtp_cli.launch.distributed import LAUNCHER_PID_ENV
from mtp_cli.launch.interrupt import quiet_elastic_shutdown, stopped_message
from mtp_cli.launch.start import START_METHODS, resolve_start_method, run_elastic
from mtp_cli.launch.threads import prefer_passive_openmp
from mtp_cli.plan.dims import ParallelDims
from mtp_cli.plan.run_plan import RunPlan
from mtp_cli.train.compatibility import ResumePlan, plan_resume
from mtp_cli.train.stops import (
    STOPPED_EXIT,
    STOPPED_RUN_EXIT,
    clear_stop_record,
    read_stop_record,
)

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
    start_method: str = "auto"  # launch/start.py: auto | fork | exec

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes


def default_run_dir(spec_path: Path) -> Path:
    """`runs/<spec file stem>`, relative to the current directory."""
    return Path("runs") / spec_path.stem


@dataclass
class LaunchPlan:
    """The outcome of the checks: what the launch will do."""

    run_plan: RunPlan  # the spec's plan at this world size
    run_dir: RunDir
    resume: ResumePlan
    finished: bool
    parameters: int = 0  # unique parameters of the whole model (for the start banner)
    data: DataSummary | None = None

    @property
    def dims(self) -> ParallelDims:
        assert self.run_plan.dims is not None
        return self.run_plan.dims

    @property
    def resume_step(self) -> int | None:  # None: a fresh start
        return self.resume.step


def check_options(options: LaunchOptions) -> None:
    """Flag combinations that cannot work."""
    problems = []
    if options.nproc < 1 or options.nnodes < 1:
        problems.append(Problem("--nproc and --nnodes must be at least 1"))
    if not 0 <= options.node_rank < max(options.nnodes, 1):
        problems.append(Problem(f"--node-rank {options.node_rank} is not in [0, --nnodes)"))
    if options.max_restarts < 0:
        problems.append(Problem("--max-restarts must be >= 0"))
    if options.start_method not in START_METHODS:
        problems.append(Problem(f"unknown start method {options.start_method!r}",
                                file="--start-method",
                                hint=f"use one of: {', '.join(START_METHODS)}"))
    elif options.start_method == "fork" and not hasattr(os, "fork"):
        problems.append(Problem("this platform cannot fork", file="--start-method",
                                hint="use --start-method exec"))
    if options.nnodes > 1 and not options.rdzv_endpoint:
        problems.append(Problem("--nnodes > 1 needs --rdzv-endpoint HOST:PORT "
                                "(the same on every node)"))
    if problems:
        raise UserError(problems=problems)


def check_resume(spec: RunSpec, run_dir: RunDir, options: LaunchOptions,
                 shapes: dict[str, tuple[int, ...]] | None = None) -> ResumePlan:
    """What a resume starts from (`train.compatibility.plan_resume`); nothing with --overwrite.
    `shapes`: the model's state-dict shapes, when the caller built it already."""
    if options.overwrite:
        return ResumePlan(None)
    return plan_resume(spec, run_dir, allow_imports=options.allow_imports, shapes=shapes)


def plan_launch(spec: RunSpec, options: LaunchOptions, *,
                warn: Callable[[str], None] | None = None) -> LaunchPlan:
    """Every check that needs no process group; raises `UserError`; creates nothing. `warn`
    hears about data files that were skipped or do not look like text."""
    from mtp_cli.builders.model_builder import model_shapes
    from mtp_cli.data import build_datasets

    check_options(options)
    check_rendezvous(options.rdzv_backend, options.rdzv_endpoint)
    run_plan = RunPlan.of(spec, options.world_size)
    run_plan.dims.check_supported(spec)
    check_backend(spec)
    # one meta build: its parameter count, its tensors against a checkpoint's, and every
    # train.freeze entry names a parameter
    model = meta_model(spec, allow_imports=options.allow_imports)
    parameters = sum(p.numel() for p in model.parameters())
    shapes = model_shapes(model)
    del model
    train_set, val_set = build_datasets(spec, warn=warn)
    data = data_summary(spec, train_set.num_documents, train_set.num_tokens,
                        val_set.num_tokens, blend_fractions(spec, train_set))
    if spec.train.eval_interval and len(val_set) == 0:
        raise UserError(problems=[Problem(
            "the validation split is empty", key="data.val_fraction",
            hint="raise data.val_fraction, or set train.eval_interval=0")])
    run_dir = RunDir(options.run_dir)
    check_creatable(run_dir.root)
    check_run_dir_entries(run_dir)
    resume = check_resume(spec, run_dir, options, shapes)
    finished = resume.step is not None and resume.step >= spec.train.steps
    return LaunchPlan(run_plan=run_plan, run_dir=run_dir, resume=resume, finished=finished,
                      parameters=parameters, data=data)


def _banner(spec: RunSpec, options: LaunchOptions, plan: LaunchPlan) -> str:
    checkpoint = plan.resume.checkpoint
    return start_banner(plan.run_plan, plan.run_dir, parameters=plan.parameters,
                        nproc=options.nproc, nnodes=options.nnodes,
                        resume_step=plan.resume_step, data=plan.data,
                        resume_checkpoint=checkpoint.path.name if checkpoint else None)


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


def _run_workers(argv: list[str], run_dir: RunDir, start_method: str) -> int:
    """Run torch.distributed.run in this process; map its failures to exit codes."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        with quiet_elastic_shutdown():
            run_elastic(argv, WORKER_MODULE, resolve_start_method(start_method))
    except ChildFailedError as error:
        codes = {failure.exitcode for failure in error.failures.values()}
        if codes == {USER_ERROR_EXIT}:
            return USER_ERROR_EXIT  # the worker printed its message
        if STOPPED_EXIT in codes:
            return STOPPED_RUN_EXIT  # a deliberate stop (a full disk): the worker said why
        print(error.format_msg(), file=sys.stderr, flush=True)
        return 1
    except SignalException as error:
        print(stopped_message(int(error.sigval), run_dir), file=sys.stderr, flush=True)
        return 128 + int(error.sigval)
    return 0


def _warn_on_stderr(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)


def launch(spec: RunSpec, options: LaunchOptions, *, echo: Callable[[str], None] = print,
           warn: Callable[[str], None] = _warn_on_stderr) -> int:
    """Check, then train; returns the process exit code (0 also for an already finished run)."""
    plan = plan_launch(spec, options, warn=warn)
    run_dir = plan.run_dir
    for warning in plan.resume.warnings:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
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
            removed = overwrite_summary(run_dir)
            run_dir.clear()
            if removed:
                echo(removed)
        echo(_banner(spec, options, plan))
        if plan.resume.schedule_note:
            echo(plan.resume.schedule_note)
        os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
        # The c10d rendezvous shares its TCPStore with the workers' process group by default,
        # and a restarted group then reads the dead group's gloo/nccl addresses from it
        # (pytorch/pytorch#135712): give every attempt its own store instead.
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
        prefer_passive_openmp()  # for exec'd workers when `launch` is called from Python
        if "OMP_NUM_THREADS" not in os.environ and options.nproc > 1:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
                os.cpu_count() or 1)
            os.environ["OMP_NUM_THREADS"] = str(max(1, cores // options.nproc))
        sys.stdout.flush()
        clear_stop_record(run_dir)
        code = _run_workers(torchrun_argv(spec, options, run_dir), run_dir,
                            options.start_method)
        stopped = read_stop_record(run_dir)  # the workers stopped on purpose (a NaN step)
        if code == 0 and stopped is not None:
            print(f"error: {stopped['message']}", file=sys.stderr, flush=True)
            return stopped["exit_code"]
        return code
    finally:
        lock.release()
