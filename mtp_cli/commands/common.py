"""What every command shares: the consoles, exit 2 for `UserError`, the common arguments."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from mtp_cli.errors import UserError

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


OverwriteOpt = Annotated[bool, typer.Option(
    "--overwrite", help="Replace --out if it exists (the new one is renamed into place whole).")]


CheckpointArg = Annotated[Path, typer.Argument(
    help="A run directory, a DCP checkpoint (any layout), or a directory written by mtp export.",
    show_default=False)]
