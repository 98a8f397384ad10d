"""The `mtp` command line: parse, call one library function, render.

Every command turns a `UserError` into a message on stderr and exit code 2, without a traceback;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import yaml
from rich.console import Console
from rich.markup import escape

from mtp_cli.errors import Problem, UserError

app = typer.Typer(
    name="mtp",
    help="Train language models with DeepSeek-V3-style Multi-Token Prediction (MTP).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
error_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

SpecArg = Annotated[Path, typer.Argument(help="Run spec (YAML).", show_default=False)]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(help="KEY=VALUE overrides, e.g. mtp.num_layers=2 parallel.pipeline=4.",
                   show_default=False),
]
AllowImportsOpt = Annotated[
    bool, typer.Option("--allow-imports", help="Let the spec name modules as import:pkg.mod:Class.")
]


def user_errors_exit_2(command: F) -> F:
    """Print `UserError`s for people and exit 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UserError as error:
            for line in error.render().splitlines():
                error_console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, markup=True,
                                    soft_wrap=True)
            raise typer.Exit(error.exit_code) from None

    return wrapper  # type: ignore[return-value]


def print_warning(text: str) -> None:
    error_console.print(f"[yellow]warning:[/] {escape(text)}", highlight=False, soft_wrap=True)


def print_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2) + "\n")


@app.command()
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


@app.command("inspect-ckpt")
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


@app.command()
@user_errors_exit_2
def report(
    run_dirs: Annotated[list[Path], typer.Argument(
        help="Run directories (each with a metrics.jsonl).", show_default=False)],
    out: Annotated[Path | None, typer.Option(
        "--out", help="Where the PNG plots go (default: the run's directory; the current "
                      "directory for several runs).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the tables as JSON.")] = False,
) -> None:
    """Per-depth loss and acceptance tables and plots for one or more runs."""
    from mtp_cli.report import build_report
    from mtp_cli.views.report_view import render_report

    result = build_report(run_dirs, out)
    for warning in result.warnings:
        print_warning(warning)
    if as_json:
        print_json(result.as_dict())
    else:
        render_report(console, result)


@app.command()
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


OverwriteOpt = Annotated[bool, typer.Option(
    "--overwrite", help="Replace --out if it exists (the new one is renamed into place whole).")]


@app.command()
@user_errors_exit_2
def export(
    checkpoint: Annotated[Path, typer.Argument(
        help="A run directory (the checkpoint a resume would use), a DCP checkpoint written at "
             "any layout, or a torch.save state-dict file.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="The Hugging Face model directory to write.",
                                      show_default=False)],
    dtype: Annotated[str | None, typer.Option(
        "--dtype", help="bf16, fp16 or fp32 (default: each tensor's dtype in the checkpoint).",
    )] = None,
    shard_size: Annotated[str, typer.Option(
        "--shard-size", help="Largest safetensors file, e.g. 5GB, 500MB, 2GiB.")] = "5GB",
    spec: Annotated[Path | None, typer.Option(
        "--spec", help="The run spec, for a checkpoint that stores none (a state-dict file).",
    )] = None,
    overwrite: OverwriteOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    target: Annotated[str, typer.Option(
        "--target", help="transformers, vllm or sglang: the engine whose layout a dense model's "
                         "MTP depths get (vllm/sglang: MiMo's). DeepSeek-V3 and GLM-4.5 exports "
                         "are the same for all three.")] = "transformers",
) -> None:
    """Write CHECKPOINT as a Hugging Face model (config.json, sharded safetensors with the MTP
    depths at model.layers.{N+k}, or in MiMo's layout for --target vllm/sglang, tokenizer)."""
    from mtp_cli.hf.export import DTYPES, export_checkpoint

    if dtype is not None and dtype not in DTYPES:
        raise UserError(problems=[Problem(f"{dtype!r} is not one of {', '.join(DTYPES)}",
                                          key="--dtype")])
    echo = None if as_json else (lambda text: console.print(text, highlight=False, markup=False))
    result = export_checkpoint(checkpoint, out, spec_path=spec, dtype=dtype,
                               shard_size=shard_size, overwrite=overwrite, echo=echo,
                               target=target)
    if as_json:
        print_json(result.as_dict())
        return
    for note in result.notes:
        console.print(f"note: {note}", highlight=False, markup=False)
    console.print(f"exported {result.tensors} tensors ({result.nbytes / 1e6:.1f} MB) in "
                  f"{result.shards} shards as {result.architecture} to {result.out}",
                  highlight=False, markup=False)


@app.command("import")
@user_errors_exit_2
def import_(
    hf_dir: Annotated[Path, typer.Argument(
        help="A Hugging Face model directory (config.json and safetensors files).",
        show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="The run directory to create.",
                                      show_default=False)],
    overrides: OverridesArg = None,
    mtp_from: Annotated[Path | None, typer.Option(
        "--mtp-from", help="A Hugging Face directory of the same architecture and dimensions "
                           "(e.g. the base a model was fine-tuned from) whose MTP depths to take.",
        show_default=False)] = None,
    overwrite: OverwriteOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Make a run directory (spec.yaml and a step-0 checkpoint) from a pretrained DeepSeek-V3,
    GLM-4.5, Llama or Qwen2 model; `mtp train OUT/spec.yaml --run-dir OUT` trains it."""
    from mtp_cli.hf.importer import import_model

    result = import_model(hf_dir, out, overrides or (), overwrite=overwrite, mtp_from=mtp_from)
    if as_json:
        print_json(result.as_dict())
        return
    for note in result.notes:
        console.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)
    console.print(f"imported {result.imported} tensors of {result.architecture} into "
                  f"{result.run_dir}; train with: mtp train {result.run_dir / 'spec.yaml'} "
                  f"--run-dir {result.run_dir}", highlight=False, markup=False, soft_wrap=True)


CheckpointArg = Annotated[Path, typer.Argument(
    help="A run directory, a DCP checkpoint (any layout), or a directory written by mtp export.",
    show_default=False)]


@app.command()
@user_errors_exit_2
def generate(
    checkpoint: CheckpointArg,
    prompt: Annotated[list[str] | None, typer.Option(
        "--prompt", help="A prompt (repeat for a batch).", show_default=False)] = None,
    prompt_file: Annotated[Path | None, typer.Option(
        "--prompt-file", help="Prompts, one per line.", show_default=False)] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 128,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    speculative: Annotated[str, typer.Option(
        "--speculative", help="auto (with MTP layers), on (require them) or off.")] = "auto",
    draft_depths: Annotated[int | None, typer.Option(
        "--draft-depths", help="MTP depths that draft (default: all).", show_default=False)] = None,
    speedup_repeats: Annotated[int, typer.Option(
        "--speedup-repeats", min=1,
        help="Timed (plain, speculative) pairs; the speed-up is the median of their ratios.")
    ] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print results and statistics as JSON.")
                       ] = False,
) -> None:
    """Decode prompts with a KV cache; with MTP layers, exact self-speculative decoding."""
    from mtp_cli.generate import GenerateOptions, load_for_generation
    from mtp_cli.generate import generate as run_generate
    from mtp_cli.generate.run import collect_prompts
    from mtp_cli.views.generate_view import TextPrinter, render_generate

    texts, where = collect_prompts(prompt or [], prompt_file)
    options = GenerateOptions(max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=top_p, seed=seed, speculative=speculative,  # type: ignore[arg-type]
                              draft_depths=draft_depths, speedup_repeats=speedup_repeats)
    loaded = load_for_generation(checkpoint)
    for note in loaded.notes:
        error_console.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)
    printer = None if as_json or len(texts) != 1 else TextPrinter(console, texts[0])
    result = run_generate(loaded, texts, options, where=where, on_text=printer)
    if as_json:
        print_json(result.as_dict())
    else:
        render_generate(console, result, streamed=printer is not None)


@app.command("eval")
@user_errors_exit_2
def eval_(
    checkpoint: CheckpointArg,
    split: Annotated[str, typer.Option("--split", help="val (held out) or train.")] = "val",
    tokens: Annotated[int, typer.Option("--tokens", help="Tokens of the split to score.")
                      ] = 16384,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Held-out losses per depth, training-time acceptance proxies and the acceptance length of
    real speculative decoding; writes RUN_DIR/eval/step_NNNNNNN.json."""
    from mtp_cli.generate import load_for_generation
    from mtp_cli.generate.eval import evaluate
    from mtp_cli.views.generate_view import render_eval

    result = evaluate(load_for_generation(checkpoint), split=split, tokens=tokens)
    if as_json:
        print_json(result)
    else:
        render_eval(console, result)


@app.command()
@user_errors_exit_2
def schema() -> None:
    """Print the JSON Schema of spec files (for editors: yaml-language-server)."""
    from mtp_cli.config.schema import RunSpec

    print_json(RunSpec.model_json_schema())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
