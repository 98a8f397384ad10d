"""How `mtp generate` and `mtp eval` look on a terminal."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mtp_cli.generate.run import GenerateResult


class TextPrinter:
    """Streams one prompt's completion to the terminal as tokens are committed."""

    def __init__(self, console: Console, prompt: str) -> None:
        self.console = console
        console.print(prompt, end="", highlight=False, markup=False, soft_wrap=True)

    def __call__(self, row: int, text: str) -> None:
        self.console.file.write(text)
        self.console.file.flush()


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def summary_line(result: GenerateResult) -> str:
    data = result.as_dict()
    parts = [f"{data['tokens']} tokens in {data['seconds']:.2f}s "
             f"({data['tokens_per_s'] or 0:.1f} tok/s)"]
    spec = data["speculative"]
    if spec is not None:
        rates = ", ".join(f"d{d['depth']} {_rate(d['acceptance_rate'])}"
                          f" (cond {_rate(d['conditional_acceptance_rate'])})"
                          for d in spec["per_depth"])
        parts.append(f"speculative K={spec['draft_depths']}: mean accepted length "
                     f"{spec['mean_accepted_length']:.2f}; acceptance {rates}")
    if "plain" in data:
        repeats = data.get("speedup_repeats")
        parts.append(f"plain {data['plain']['tokens_per_s'] or 0:.1f} tok/s, speed-up "
                     f"{data['speedup'] or 0:.2f}x"
                     + (f" (median of {repeats} interleaved pairs)" if repeats else ""))
        if data["identical_to_plain"] is not None:
            parts.append("identical to plain" if data["identical_to_plain"]
                         else "DIFFERS from plain decoding")
    return " | ".join(parts)


def render_generate(console: Console, result: GenerateResult, *, streamed: bool) -> None:
    if streamed:
        console.print()
    else:
        for i, (prompt, text) in enumerate(zip(result.prompts, result.texts, strict=True)):
            console.print(f"[bold]--- {i + 1} ---[/]")
            console.print(escape(prompt + text), highlight=False, soft_wrap=True)
    console.print(summary_line(result), highlight=False, markup=False, soft_wrap=True)


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def eval_table(result: dict[str, Any]) -> Table:
    """Per depth: loss, the three teacher-forced proxies, real decoding acceptance."""
    title = (f"eval of step {result.get('step')} on {result['split']} "
             f"({result['tokens']:,} tokens): lm loss {_num(result['lm_loss'])}")
    table = Table(title=escape(title),
                  header_style="bold", title_justify="left")
    for column in ("depth", "loss", "top1=label", "top1=main", "joint prefix", "spec. accept",
                   "spec. cond."):
        table.add_column(column, justify="right")
    for row in result["depths"]:
        table.add_row(str(row["depth"]), _num(row["loss"]), _rate(row["top1_vs_labels"]),
                      _rate(row["top1_vs_main_greedy"]), _rate(row["joint_prefix_rate"]),
                      _rate(row.get("speculative_acceptance_rate")),
                      _rate(row.get("speculative_conditional_acceptance_rate")))
    return table


def render_eval_summary(console: Console, result: dict[str, Any]) -> None:
    """The eval table and the acceptance lengths (`mtp eval`, and `mtp report` when a run has
    been evaluated); tolerant of a hand-edited file (missing keys show as "-")."""
    try:
        console.print(eval_table(result))
    except (KeyError, TypeError, ValueError, AttributeError):
        console.print("eval result unreadable (not as mtp eval writes it)")
        return
    accept = result.get("acceptance_length") or {}
    console.print(f"acceptance length (tokens per round): teacher-forced "
                  f"{_num(accept.get('teacher_forced'), 3)}, speculative decoding "
                  f"{_num(accept.get('speculative'), 3)}", highlight=False)


def render_eval(console: Console, result: dict[str, Any]) -> None:
    render_eval_summary(console, result)
    if result.get("written"):
        console.print(f"wrote {result['written']}", highlight=False, markup=False)

