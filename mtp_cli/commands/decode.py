"""`mtp generate` and `mtp eval`: decoding and held-out evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from mtp_cli.commands.common import (
    CheckpointArg,
    console,
    error_console,
    print_json,
    user_errors_exit_2,
)


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
    from mtp_cli.generate.run import check_option_values, collect_prompts
    from mtp_cli.views.generate_view import TextPrinter, render_generate

    texts, where = collect_prompts(prompt or [], prompt_file)
    options = GenerateOptions(max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=top_p, seed=seed, speculative=speculative,  # type: ignore[arg-type]
                              draft_depths=draft_depths, speedup_repeats=speedup_repeats)
    check_option_values(options)  # before the model loads
    loaded = load_for_generation(checkpoint)
    for note in loaded.notes:
        error_console.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)
    printer = None if as_json or len(texts) != 1 else TextPrinter(console, texts[0])
    result = run_generate(loaded, texts, options, where=where, on_text=printer)
    if as_json:
        print_json(result.as_dict())
    else:
        render_generate(console, result, streamed=printer is not None)


@user_errors_exit_2
def eval_(
    checkpoint: CheckpointArg,
    split: Annotated[str, typer.Option("--split", help="val (held out) or train.")] = "val",
    tokens: Annotated[int, typer.Option(
        "--tokens", help="Tokens of the split to score (training's validation scores "
        "train.eval_steps x global_batch_size x seq_length: 4,096 for specs/tiny.yaml).")
                      ] = 16384,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Held-out losses per depth, training-time acceptance proxies and the acceptance length of
    real speculative decoding; writes RUN_DIR/eval/step_NNNNNNN.json."""
    from mtp_cli.generate import load_for_generation
    from mtp_cli.generate.eval import evaluate
    from mtp_cli.views.generate_view import render_eval

    loaded = load_for_generation(checkpoint)
    for note in loaded.notes:  # which checkpoint, when not the one `latest` names
        error_console.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)
    result = evaluate(loaded, split=split, tokens=tokens)
    if as_json:
        print_json(result)
    else:
        render_eval(console, result)
