"""The `pipeline_model_parallel_layout` string: parsed into stages, every token with its position.

Grammar (Megatron-Core's): `E` embedding, `t` decoder layer, `m` MTP layer, `L` loss, `|` between
stages; `x*n` repeats one character (a token or `|`), `(...)*n` repeats a group; commas are
ignored everywhere (so `t*1,2` is `t*12`, as in Megatron). Stages are listed virtual-stage-major:
stage index = vp_stage * pipeline + pp_rank. Example: `Et|(tt|)*30mL`.

Every token remembers the 0-based index of the character it came from, so that the validator in
`mtp_cli.plan.placement` can point at the character that breaks a rule. Megatron's own parser is a
pair of regular expressions; the strings both accept expand identically, and the few it reads in
a surprising way (nested groups, `x*2*3`) are rejected here with an explanation.
"""

from __future__ import annotations

from dataclasses import dataclass

from mtp_cli.errors import SpecError

TOKENS = {"E": "embedding", "t": "decoder layer", "m": "MTP layer", "L": "loss"}
STAGE_SEPARATOR = "|"
MAX_EXPANDED_LENGTH = 1_000_000  # guards `t*999999999` against eating the machine


class LayoutError(SpecError):
    """A layout that breaks a rule; `position` is the 0-based index of the character at fault."""

    def __init__(self, text: str, position: int, rule: str, detail: str) -> None:
        self.text, self.position, self.rule, self.detail = text, position, rule, detail
        super().__init__(self.describe())

    def describe(self) -> str:
        """`detail [rule: ...] at layout column N:` then the layout and a caret under column N."""
        return (
            f"{self.detail} [rule: {self.rule}] at layout column {self.position + 1}:\n"
            f"{caret_rendering(self.text, self.position)}"
        )


def caret_rendering(text: str, position: int, indent: str = "    ") -> str:
    """Two lines: the layout, and a `^` under the character at `position` (may be len(text))."""
    return f"{indent}{text}\n{indent}{' ' * position}^"


@dataclass(frozen=True)
class Token:
    """One layer of the expanded layout: `kind` is E, t, m or L; `position` indexes the source."""

    kind: str
    position: int


@dataclass(frozen=True)
class ParsedLayout:
    """The layout's stages in listing order (virtual-stage-major), tokens expanded."""

    text: str
    stages: tuple[tuple[Token, ...], ...]
    separators: tuple[int, ...]  # position of the `|` that closes each stage but the last

    def tokens(self) -> list[Token]:
        """Every token in layer order (the order the stages are listed in)."""
        return [token for stage in self.stages for token in stage]


class _Parser:
    """Recursive descent over the layout with commas dropped, positions kept."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.chars = [(c, i) for i, c in enumerate(text) if c != ","]
        self.index = 0

    def error(self, position: int, rule: str, detail: str) -> LayoutError:
        return LayoutError(self.text, position, rule, detail)

    def peek(self) -> tuple[str, int] | None:
        return self.chars[self.index] if self.index < len(self.chars) else None

    def end_position(self) -> int:
        return len(self.text)

    def parse(self) -> list[tuple[str, int]]:
        items = self.sequence(inside_group=False)
        if len(items) > MAX_EXPANDED_LENGTH:
            raise self.error(0, "syntax", f"the layout expands to {len(items):,} characters")
        return items

    def sequence(self, *, inside_group: bool) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        while (current := self.peek()) is not None:
            char, position = current
            if char == ")":
                if inside_group:
                    return out
                raise self.error(position, "syntax", "')' without a matching '('")
            out += self.repeated(self.atom())
            if len(out) > MAX_EXPANDED_LENGTH:
                raise self.error(position, "syntax", "the layout expands to too many characters")
        if inside_group:
            raise self.error(self.end_position(), "syntax", "'(' is never closed")
        return out

    def atom(self) -> tuple[list[tuple[str, int]], int, bool]:
        """One token, `|` or group: (expanded items, start position, is_group)."""
        char, position = self.chars[self.index]
        self.index += 1
        if char in TOKENS or char == STAGE_SEPARATOR:
            return [(char, position)], position, False
        if char == "(":
            nested = next((p for c, p in self.chars[self.index:] if c in "()"), None)
            if nested is not None and self.text[nested] == "(":
                raise self.error(nested, "syntax", "nested parentheses are not supported")
            body = self.sequence(inside_group=True)
            close = self.peek()
            assert close is not None  # sequence() returns inside a group only at ')'
            self.index += 1
            if not body:
                raise self.error(position, "syntax", "empty group '()'")
            if (after := self.peek()) is None or after[0] != "*":
                where = after[1] if after else self.end_position()
                raise self.error(where, "syntax", "a group '(...)' must be followed by *n")
            return body, position, True
        if char == "*":
            raise self.error(position, "syntax", "'*' must follow a token, '|' or a group")
        if char.isdigit():
            raise self.error(position, "syntax", f"stray digit {char!r}: repeat with x*n")
        if char.isspace():
            raise self.error(position, "syntax", "whitespace is not allowed in a layout")
        raise self.error(
            position, "syntax",
            f"unknown character {char!r}: use E (embedding), t (decoder layer), m (MTP layer), "
            f"L (loss), '|' between stages, x*n or (...)*n to repeat, ',' to group visually",
        )

    def repeated(self, atom: tuple[list[tuple[str, int]], int, bool]) -> list[tuple[str, int]]:
        items, _, _ = atom
        current = self.peek()
        if current is None or current[0] != "*":
            return items
        star = current[1]
        self.index += 1
        digits = ""
        while (nxt := self.peek()) is not None and nxt[0].isdigit():
            digits += nxt[0]
            self.index += 1
        if not digits:
            where = nxt[1] if nxt else self.end_position()
            raise self.error(where, "syntax", f"'*' at column {star + 1} needs a count, e.g. t*4")
        if (nxt := self.peek()) is not None and nxt[0] == "*":
            raise self.error(nxt[1], "syntax",
                             "a repeat cannot be repeated again (write one count, or a group)")
        count = int(digits)
        if count * len(items) > MAX_EXPANDED_LENGTH:
            raise self.error(star, "syntax", f"the repeat *{count} expands to too many characters")
        return items * count


def parse_layout(text: str) -> ParsedLayout:
    """Expand the repeats and split into stages; raises `LayoutError` on a syntax error."""
    if not text.replace(",", ""):
        raise LayoutError(text, 0, "syntax", "the layout is empty")
    items = _Parser(text).parse()
    stages: list[tuple[Token, ...]] = []
    separators: list[int] = []
    current: list[Token] = []
    for char, position in items:
        if char == STAGE_SEPARATOR:
            stages.append(tuple(current))
            separators.append(position)
            current = []
        else:
            current.append(Token(char, position))
    stages.append(tuple(current))
    return ParsedLayout(text, tuple(stages), tuple(separators))
