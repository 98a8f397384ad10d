"""README quotes what the tool prints: every block README marks `<!-- output of: mtp ARGS -->`
is checked against the output of `mtp ARGS` run now.

Each non-empty line of the fenced block that follows the marker must appear in the command's
output (runs of white space folded; a line starting with `$ ` or its continuation, the command as
typed, is skipped). A quoted figure that the code no longer prints fails here, so README cannot
drift from the tool (issue: it once said the DeepSeek-V3 build needs 172 GiB after meta-device
experts had brought it to 17).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mtp_cli.cli import app

README = Path(__file__).resolve().parent.parent / "README.md"
MARKER = re.compile(r"^<!-- output of: mtp (?P<args>.+?) -->$")


def _fold(text: str) -> str:
    return " ".join(text.split())


def quoted_outputs(readme_text: str) -> list[tuple[int, list[str], list[str]]]:
    """(line number, command arguments, quoted lines) of each marked block."""
    lines = readme_text.splitlines()
    blocks = []
    for index, line in enumerate(lines):
        match = MARKER.match(line)
        if not match:
            continue
        assert lines[index + 1].startswith("```"), f"README.md:{index + 2}: no block after marker"
        end = next(i for i in range(index + 2, len(lines)) if lines[i].startswith("```"))
        body, continued = [], False
        for quoted in lines[index + 2:end]:
            if quoted.startswith("$ ") or continued:
                continued = quoted.rstrip().endswith("\\")
                continue
            if quoted.strip():
                body.append(quoted)
        blocks.append((index + 1, shlex.split(match["args"]), body))
    return blocks


BLOCKS = quoted_outputs(README.read_text(encoding="utf-8"))


def test_readme_marks_the_outputs_it_quotes() -> None:
    assert len(BLOCKS) >= 3  # the placement table and the DeepSeek-V3 memory plans


def test_quoted_outputs_parse_as_blocks() -> None:
    text = "x\n<!-- output of: mtp build a.yaml --memory -->\n```\n$ mtp build \\\n  a\nrow 1\n\n```\n"
    assert quoted_outputs(text) == [(2, ["build", "a.yaml", "--memory"], ["row 1"])]


@pytest.mark.slow
@pytest.mark.parametrize(("line", "args", "quoted"), BLOCKS,
                         ids=[f"README.md:{line}" for line, _, _ in BLOCKS])
def test_readme_quotes_what_the_command_prints(line: int, args: list[str],
                                               quoted: list[str], monkeypatch) -> None:
    from mtp_cli.commands import common

    # the console's width is fixed when it is created (at import, in whichever test came
    # first): README quotes tables as a 200-column terminal shows them
    monkeypatch.setattr(common.console, "width", 200)
    result = CliRunner().invoke(app, args, prog_name="mtp", env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    printed = _fold(result.output)
    missing = [q for q in quoted if _fold(q) not in printed]
    assert not missing, f"README.md:{line}: not in `mtp {shlex.join(args)}`'s output: {missing}"
