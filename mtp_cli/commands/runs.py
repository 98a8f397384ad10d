"""`mtp inspect-ckpt` and `mtp report`: what a run wrote."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mtp_cli.commands.common import (
    console,
    print_json,
    print_warning,
    user_errors_exit_2,
)


@user_errors_exit_2
def inspect_ckpt(
    path: Annotated[Path, typer.Argument(
        help="A DCP checkpoint directory, a run directory (its checkpoints/latest) or a "
             "torch.save state-dict file.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print the facts as JSON.")] = False,
    tensors: Annotated[str | None, typer.Option(
        "--tensors", metavar="PATTERN",
        help="List matching tensors: a glob (mtp.layers.*), a substring (eh_proj) or "
             "re:REGEX.")] = None,
    strict: Annotated[bool, typer.Option(
        "--strict", help="Also check every weight and loss is finite; exit 1 if any check "
                         "fails.")] = False,
    spec: Annotated[Path | None, typer.Option(
        "--spec", help="Check against this spec instead of the stored one (or where none is "
                       "stored).")] = None,
) -> None:
    """Show a checkpoint's spec, tensors by part and MTP structure/tie checks."""
    from mtp_cli.config.loader import load_spec
    from mtp_cli.inspect import inspect_checkpoint
    from mtp_cli.views.inspect_view import render_inspect

    run_spec = load_spec(spec) if spec is not None else None
    report = inspect_checkpoint(path, spec=run_spec, tensors=tensors, finite=strict,
                                spec_path=spec)
    if as_json:
        print_json(report.as_dict())
    else:
        render_inspect(console, report)
    if strict and not report.passed:
        raise typer.Exit(1)


@user_errors_exit_2
def report(
    run_dirs: Annotated[list[Path], typer.Argument(
        help="Run directories (each with a metrics.jsonl).", show_default=False)],
    out: Annotated[Path | None, typer.Option(
        "--out", help="Where the PNG plots go (default: the run's directory; the current "
                      "directory for several runs).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the tables as JSON.")] = False,
) -> None:
    """Per-depth loss and acceptance tables and plots for one or more runs (or a sweep)."""
    from mtp_cli.commands.sweep import sweep_report
    from mtp_cli.report import build_report
    from mtp_cli.views.report_view import render_report

    if len(run_dirs) == 1 and (run_dirs[0] / "sweep_plan.json").is_file():
        return sweep_report(run_dirs[0], as_json)
    result = build_report(run_dirs, out)
    for warning in result.warnings:
        print_warning(warning)
    if as_json:
        print_json(result.as_dict())
    else:
        render_report(console, result)
