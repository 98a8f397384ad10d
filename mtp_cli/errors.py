"""Errors meant for people: the CLI prints them without a traceback and exits 2."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input, located as precisely as we can."""

    message: str
    file: str | None = None
    line: int | None = None  # 1-based
    column: int | None = None  # 1-based
    key: str | None = None  # dotted key path, e.g. model.hidden_size
    hint: str | None = None

    def render(self) -> str:
        where = ""
        if self.file is not None:
            where = self.file
            if self.line is not None:
                where += f":{self.line}"
                if self.column is not None:
                    where += f":{self.column}"
            where += ": "
        key = f"{self.key}: " if self.key else ""
        hint = f" ({self.hint})" if self.hint else ""
        return f"{where}{key}{self.message}{hint}"


def yaml_kind(value: object) -> str:
    """What a YAML file calls `value` ("a list", "a number"), for messages about specs: never
    a Python type name."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return "a value of another kind"


class UserError(Exception):
    """Bad input from the user: exit code 2, a clear message, no traceback."""

    exit_code = 2

    def __init__(self, message: str | None = None, problems: list[Problem] | None = None):
        self.problems = problems or [Problem(message or "invalid input")]
        super().__init__(self.render())

    def render(self) -> str:
        return "\n".join(p.render() for p in self.problems)


class SpecError(UserError):
    """A spec file (or override) that does not load or does not validate."""
