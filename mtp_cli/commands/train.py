"""`mtp train`: the launcher, or a dry run of one rank."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mtp_cli.commands.common import (
    AllowImportsOpt,
    OverridesArg,
    SpecArg,
    console,
    error_console,
    print_warning,
    user_errors_exit_2,
)
from mtp_cli.errors import Problem, UserError


@user_errors_exit_2
def train(
    spec: SpecArg,
    overrides: OverridesArg = None,
    nproc: Annotated[int, typer.Option("--nproc", min=1,
                                       help="Worker processes on this node (one device each).")] = 1,
    nnodes: Annotated[int, typer.Option("--nnodes", min=1, help="Nodes in the job.")] = 1,
    node_rank: Annotated[int, typer.Option(
        "--node-rank", min=0,
        help="This node's rank. Used only by --rdzv-backend static; c10d assigns ranks itself.",
    )] = 0,
    rdzv_endpoint: Annotated[str | None, typer.Option(
        "--rdzv-endpoint", help="HOST:PORT of the rendezvous, the same on every node "
                                "(needed with --nnodes > 1; one node: a local standalone one).",
    )] = None,
    rdzv_backend: Annotated[str, typer.Option(
        "--rdzv-backend", help="Rendezvous backend with --rdzv-endpoint: c10d or static.",
    )] = "c10d",
    rdzv_id: Annotated[str | None, typer.Option(
        "--rdzv-id", help="Job id shared by the nodes' launchers (default: from the run dir).",
    )] = None,
    max_restarts: Annotated[int, typer.Option(
        "--max-restarts", min=0,
        help="Restart the workers this often after a failure (they resume from the latest "
             "checkpoint).",
    )] = 0,
    start_method: Annotated[str, typer.Option(
        "--start-method",
        help="How workers start: fork (from this process, which has imported the training "
             "code: no per-worker imports), exec (a fresh interpreter each, as torchrun starts "
             "a module), auto (fork unless CUDA devices are visible).")] = "auto",
    run_dir: Annotated[Path | None, typer.Option(
        "--run-dir", help="Run directory (metrics.jsonl, tb/, checkpoints/); default "
                          "runs/<spec file stem>. A run directory with a checkpoint resumes.",
        show_default=False,
    )] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Discard the run directory's checkpoints and metrics; start afresh.",
    )] = False,
    allow_imports: AllowImportsOpt = False,
    dry_run_rank: Annotated[int | None, typer.Option(
        "--dry-run-rank", help="Build only this global rank's shards at --world-size against a "
                               "fake process group, in this process; train --steps steps on "
                               "synthetic batches and print its measured peak memory next to "
                               "the memory plan's. Touches no run directory.")] = None,
    world_size: Annotated[int | None, typer.Option(
        "--world-size", min=1, help="With --dry-run-rank: ranks in the job being rehearsed.",
    )] = None,
    steps: Annotated[int, typer.Option("--steps", min=1,
                                       help="With --dry-run-rank: steps to take.")] = 2,
    expert_load: Annotated[str, typer.Option(
        "--expert-load",
        help="With --dry-run-rank and expert parallel: the synthetic routing, equal shares per "
             "expert or every token routed to this rank's experts.")] = "uniform",
) -> None:
    """Train SPEC over --nproc processes per node (torch.distributed.run): data, tensor,
    pipeline and context parallel as `parallel` says."""
    from mtp_cli.launch.threads import prefer_passive_openmp

    prefer_passive_openmp()  # before torch is imported: the forked workers inherit it
    from mtp_cli.config.loader import load_spec
    from mtp_cli.launch.launcher import LaunchOptions, default_run_dir, launch

    run_spec = load_spec(spec, overrides or (), allow_imports=allow_imports)
    if dry_run_rank is not None or world_size is not None:
        _dry_run(run_spec, dry_run_rank, world_size, steps, allow_imports, expert_load)
        return
    options = LaunchOptions(
        run_dir=run_dir or default_run_dir(spec), nproc=nproc, nnodes=nnodes,
        node_rank=node_rank, rdzv_endpoint=rdzv_endpoint, rdzv_backend=rdzv_backend,
        rdzv_id=rdzv_id, max_restarts=max_restarts, overwrite=overwrite,
        allow_imports=allow_imports, start_method=start_method,
    )
    try:
        code = launch(run_spec, options, echo=lambda text: console.print(
            text, highlight=False, markup=False, soft_wrap=True), warn=print_warning)
    except KeyboardInterrupt:  # Ctrl-C before the workers started (later: the launcher's line)
        error_console.print("mtp train: stopped by Ctrl-C (SIGINT) before any worker started; "
                            "nothing was trained", highlight=False, markup=False)
        raise typer.Exit(130) from None
    if code:
        raise typer.Exit(code)


def _dry_run(run_spec: Any, rank: int | None, world_size: int | None, steps: int,
             allow_imports: bool, expert_load: str = "uniform") -> None:
    """`mtp train --dry-run-rank R --world-size N`: one rank, a fake group, measured vs plan."""
    from mtp_cli.launch.dry_run import EXPERT_LOADS, check_dry_run, dry_run
    from mtp_cli.views.memory_view import render_dry_run

    if rank is None or world_size is None:
        flag = "--dry-run-rank" if rank is None else "--world-size"
        raise UserError(problems=[Problem("--dry-run-rank and --world-size go together",
                                          key=flag)])
    if expert_load not in EXPERT_LOADS:
        raise UserError(problems=[Problem(
            f"{expert_load!r} is not one of {', '.join(EXPERT_LOADS)}", key="--expert-load")])
    check_dry_run(run_spec, rank, world_size)
    result = dry_run(run_spec, rank, world_size, steps, allow_imports=allow_imports,
                     expert_load=expert_load)
    render_dry_run(console, result)
