"""`mtp build` and `mtp schema`: the model a spec describes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from mtp_cli.commands.common import (
    AllowImportsOpt,
    OverridesArg,
    SpecArg,
    console,
    print_json,
    user_errors_exit_2,
)
from mtp_cli.errors import Problem, UserError


@user_errors_exit_2
def build(
    spec: SpecArg,
    overrides: OverridesArg = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the facts as JSON.")] = False,
    show_spec: Annotated[
        bool, typer.Option("--show-spec", help="Print the resolved ModuleSpec trees as YAML.")
    ] = False,
    materialize: Annotated[
        bool, typer.Option("--materialize",
                           help="Build real weights on the CPU and run one forward/backward.")
    ] = False,
    allow_imports: AllowImportsOpt = False,
    memory: Annotated[bool, typer.Option(
        "--memory", help="The per-rank memory plan: weights, gradients, optimizer state, "
                         "activations, logits and buffers of every pipeline rank.")] = False,
    world_size: Annotated[int | None, typer.Option(
        "--world-size", min=1, help="With --memory: ranks in the job (data parallel = world / "
                                    "(tensor x pipeline x context)); default: data parallel 1.",
    )] = None,
    device_memory: Annotated[str | None, typer.Option(
        "--device-memory", help="With --memory: one device's memory, e.g. 80GiB; says whether "
                                "the tightest rank fits.")] = None,
) -> None:
    """Validate SPEC, compile it on the meta device and show the model."""
    from mtp_cli.builders.module_trees import resolved_module_trees
    from mtp_cli.config.loader import load_spec
    from mtp_cli.facts.describe import describe_build, materialize_check
    from mtp_cli.views.build_view import render_build

    run_spec = load_spec(spec, overrides or (), allow_imports=allow_imports)
    if memory or world_size is not None or device_memory is not None:
        _memory_plan(spec, run_spec, world_size, device_memory, as_json, allow_imports,
                     requested=memory)
        return
    if show_spec:
        text = yaml.safe_dump({"modules": resolved_module_trees(run_spec)}, sort_keys=False)
        sys.stdout.write(text)
        return
    report = describe_build(run_spec, allow_imports=allow_imports)
    if materialize:
        report.extra["materialize"] = materialize_check(
            run_spec, allow_imports=allow_imports, parameters=report.counts.unique)
    if as_json:
        print_json({"spec": str(spec), **report.as_dict()})
        return
    render_build(console, report, title=str(spec))


def _memory_plan(spec: Path, run_spec: Any, world_size: int | None, device_memory: str | None,
                 as_json: bool, allow_imports: bool, *, requested: bool) -> None:
    """`mtp build --memory`: plan, then render."""
    from mtp_cli.facts.stage_tensors import build_memory_plan
    from mtp_cli.plan.memory import parse_memory
    from mtp_cli.views.memory_view import render_memory

    if not requested:
        flag = "--world-size" if world_size is not None else "--device-memory"
        raise UserError(problems=[Problem(f"{flag} needs --memory", key=flag)])
    limit = parse_memory(device_memory) if device_memory is not None else None
    plan = build_memory_plan(run_spec, world_size, device_memory=limit,
                             allow_imports=allow_imports)
    if as_json:
        print_json({"spec": str(spec), **plan.as_dict()})
    else:
        render_memory(console, plan)


@user_errors_exit_2
def schema() -> None:
    """Print the JSON Schema of spec files (for editors: yaml-language-server)."""
    from mtp_cli.config.schema import RunSpec

    print_json(RunSpec.model_json_schema())
