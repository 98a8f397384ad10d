"""The `mtp` command line: the typer app, assembled from `mtp_cli.commands` (one module per
concern: parse, call one library function, render).

Every command turns a `UserError` into a message on stderr and exit code 2, without a traceback;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import typer

from mtp_cli.commands import data, decode, hf, model, runs, sweep, train

app = typer.Typer(
    name="mtp",
    help="Train language models with DeepSeek-V3-style Multi-Token Prediction (MTP).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command()(model.build)
app.command("inspect-ckpt")(runs.inspect_ckpt)
app.command()(runs.report)
app.command()(sweep.sweep)
app.command()(train.train)
app.command()(hf.export)
app.command("import")(hf.import_)
app.command()(decode.generate)
app.command("eval")(decode.eval_)
app.add_typer(data.data_app, name="data")
app.command()(model.schema)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
