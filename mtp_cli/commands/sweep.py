"""`mtp sweep`: a grid of cells x seeds trained, evaluated alike and compared with statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mtp_cli.commands.common import SpecArg, console, print_json, user_errors_exit_2


def sweep_report(out: Path, as_json: bool) -> None:
    """`mtp report DIR` of a sweep directory: the sweep's table (and its PNG, rewritten)."""
    from mtp_cli.sweep import write_report
    from mtp_cli.views.sweep_view import render_sweep

    summary = write_report(out)
    if as_json:
        print_json({k: v for k, v in summary.items() if k != "curves"})
    else:
        render_sweep(console, summary)


@user_errors_exit_2
def sweep(
    spec: SpecArg,
    vary: Annotated[list[str], typer.Option("--vary", help="KEY=V1,V2,... (repeat: a grid).")],
    seeds: Annotated[int, typer.Option("--seeds", help="Runs per cell (train.seed + 0..N-1).")
                     ] = 3,
    budget: Annotated[str, typer.Option("--budget", help="The headline comparison: tokens "
                                        "(equal training tokens) or seconds (equal time).")
                      ] = "tokens",
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="Processes per run.")] = 1,
    out: Annotated[Path | None, typer.Option("--out", help="Sweep directory (default "
                                             "runs/sweep-<spec stem>).")] = None,
    common: Annotated[list[str] | None, typer.Option(
        "--set", help="KEY=VALUE for every run.", show_default=False)] = None,
    eval_tokens: Annotated[int, typer.Option("--eval-tokens", help="Held-out tokens mtp eval "
                                             "scores per run.")] = 16384,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Train a grid of cells x seeds, evaluate each run alike, compare with statistics;
    rerun to continue an unfinished sweep. Writes DIR/sweep.json and DIR/sweep.png."""
    from mtp_cli.sweep import make_grid, run_sweep
    from mtp_cli.views.sweep_view import render_sweep

    grid = make_grid(spec, vary, seeds, common or [])
    directory = out if out is not None else Path("runs") / f"sweep-{Path(spec).stem}"
    summary = run_sweep(grid, directory, nproc=nproc, budget=budget, eval_tokens=eval_tokens,
                        say=lambda text: console.print(text, highlight=False, markup=False))
    if as_json:
        print_json({k: v for k, v in summary.items() if k != "curves"})
    else:
        render_sweep(console, summary)
