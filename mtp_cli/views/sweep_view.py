"""How `mtp sweep` and `mtp report SWEEP_DIR` look on a terminal: one row per cell, the main
head's held-out loss at equal tokens and at equal time (mean +- std over seeds, difference to
the baseline with its 95% interval and Welch's p), acceptance per depth, tokens per round and
the decoding speed-up."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def _pm(summary: dict[str, Any], digits: int = 4) -> str:
    mean, std = summary.get("mean"), summary.get("std")
    if mean is None:
        return "-"
    text = f"{mean:.{digits}f}"
    return text + (f" ± {std:.{digits}f}" if std is not None else "") + f" (n={summary['n']})"


def _versus(comparison: dict[str, Any] | None) -> str:
    if comparison is None:
        return "baseline"
    text = f"{comparison['difference']:+.4f}"
    if comparison["ci_low"] is not None:
        text += f" [{comparison['ci_low']:+.4f}, {comparison['ci_high']:+.4f}]"
    if comparison["p"] is not None:
        text += f" p={comparison['p']:.3g}"
    return text


def sweep_table(summary: dict[str, Any]) -> Table:
    at = summary.get("equal_time_seconds")
    when = f"{at:.1f} s" if at else "-"
    table = Table(title=escape(f"sweep of {summary['plan']['spec']}: main-head held-out loss "
                               f"(nats/token), mean ± std over seeds; Δ to the baseline "
                               f"[95% CI] Welch p; equal time = {when}"),
                  header_style="bold", title_justify="left")
    for column in ("cell", "loss @ equal tokens", "Δ @ tokens", "loss @ equal time",
                   "Δ @ time", "acceptance per depth", "tokens/round", "speed-up"):
        table.add_column(column, justify="left" if column == "cell" else "right")
    for cell in summary["cells"]:
        versus = cell.get("vs_baseline") or {}
        acceptance = " / ".join(f"{s['mean']:.2f}" if s["mean"] is not None else "-"
                                for s in cell["acceptance_per_depth"]) or "-"
        table.add_row(escape(cell["name"]), _pm(cell["loss_equal_tokens"]),
                      _versus(versus.get("equal_tokens")) if versus else "baseline",
                      _pm(cell["loss_equal_time"]),
                      _versus(versus.get("equal_time")) if versus else "baseline",
                      acceptance, _pm(cell["tokens_per_round"], 2), _pm(cell["speedup"], 2))
    return table


def render_sweep(console: Console, summary: dict[str, Any]) -> None:
    console.print(sweep_table(summary))
    if not summary.get("complete"):
        console.print("(incomplete: some runs have no evaluation yet; rerun mtp sweep to "
                      "finish them)", highlight=False)
    for path in summary.get("written", []):
        console.print(f"wrote {escape(path)}", highlight=False, soft_wrap=True)
