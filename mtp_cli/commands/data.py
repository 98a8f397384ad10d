"""`mtp data prepare`: corpora to Megatron's .bin/.idx."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mtp_cli.commands.common import (
    console,
    error_console,
    print_json,
    print_warning,
    user_errors_exit_2,
)

data_app = typer.Typer(help="Prepare training data.", no_args_is_help=True)


@data_app.command("prepare")
@user_errors_exit_2
def data_prepare(
    inputs: Annotated[list[Path], typer.Argument(
        help="JSONL, text files or directories, .parquet/.arrow files, save_to_disk directories.",
        show_default=False)],
    tokenizer: Annotated[str, typer.Option(
        "--tokenizer", help="A tokenizer.json, or 'bytes' (ids 0-255, end of document 256).",
        show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Output prefix: writes OUT.bin and OUT.idx.",
                                      show_default=False)],
    workers: Annotated[int, typer.Option("--workers", min=1, help="Tokenizing processes.")] = 1,
    append_eod: Annotated[bool, typer.Option(
        "--append-eod", help="Append the end-of-document id after each document.")] = False,
    json_key: Annotated[str, typer.Option(
        "--json-key", help="The JSONL field (or table column) holding the text.")] = "text",
    on_bad_record: Annotated[str, typer.Option(
        "--on-bad-record", help="fail (exit 2 naming it) or skip (and count it).")] = "fail",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT.bin/.idx.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Tokenize corpora into Megatron's .bin/.idx (streaming, in parallel, in input order)."""
    from mtp_cli.data.prepare import prepare
    from mtp_cli.views.prepare_view import PrepareBar, render_prepare

    with PrepareBar(error_console) as bar:
        summary = prepare(inputs, tokenizer, out, workers=workers, append_eod=append_eod,
                          json_key=json_key, on_bad_record=on_bad_record, overwrite=overwrite,
                          warn=print_warning, on_progress=bar.update)
    if as_json:
        print_json(summary.as_dict())
    else:
        render_prepare(console, summary)
