"""`mtp export` and `mtp import`: Hugging Face model directories."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mtp_cli.commands.common import (
    OverridesArg,
    OverwriteOpt,
    console,
    print_json,
    user_errors_exit_2,
)
from mtp_cli.errors import Problem, UserError


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
    target: Annotated[str | None, typer.Option(
        "--target", help="transformers, vllm or sglang: the engine whose layout a dense model's "
                         "MTP depths get (vllm/sglang: MiMo's). Default: the layout all three "
                         "load (MiMo's for a Qwen2-shaped dense model). DeepSeek-V3 and GLM-4.5 "
                         "exports are the same for all three.")] = None,
) -> None:
    """Write CHECKPOINT as a Hugging Face model that transformers, vLLM and SGLang load
    (config.json, sharded safetensors, tokenizer; MTP depths in the --target engine's layout)."""
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
