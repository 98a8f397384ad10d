"""How `mtp report` looks on a terminal: one table per run, a comparison, the plot files."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mtp_cli.report import Report
from mtp_cli.views.generate_view import render_eval_summary

_STATS = ("first", "last", "min", "mean_last_10pct")


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _series_label(key: str) -> str:
    return key.replace("val_", "val ").replace("_cumulative_acceptance_rate", " cumulative acceptance") \
        .replace("_acceptance_rate", " acceptance rate").replace("_loss", " loss")


def _is_acceptance(key: str) -> bool:
    return key.endswith("_acceptance_rate")


def run_table(run: dict[str, Any]) -> Table:
    """Losses (nats per token) of the run: training series, then validation."""
    steps, tokens = _num(run["steps"]), _num(run["tokens"])
    table = Table(title=f"{escape(run['label'])}: {steps} steps, {tokens} tokens; "
                        "losses (nats/token)",
                  header_style="bold", title_justify="left")
    table.add_column("series")
    for column in ("first", "last", "min", "mean last 10%"):
        table.add_column(column, justify="right")
    for key, stats in run["train"].items():
        if not _is_acceptance(key):
            table.add_row(_series_label(key), *(_num(stats[s]) for s in _STATS))
    if run["validation"]:
        table.add_section()
        for key, stats in run["validation"].items():
            table.add_row(_series_label(key), _num(stats["first"]), _num(stats["last"]),
                          _num(stats["min"]), "")
    return table


def acceptance_table(run: dict[str, Any]) -> Table | None:
    """Per-depth acceptance rates (% of positions whose argmax is the label), apart from the
    losses they are not comparable with; None for a run without MTP."""
    rows = [(key, stats) for key, stats in run["train"].items() if _is_acceptance(key)]
    if not rows:
        return None
    table = Table(title=f"{escape(run['label'])}: MTP acceptance rate (%)", header_style="bold",
                  title_justify="left")
    table.add_column("series")
    for column in ("first", "last", "min", "mean last 10%"):
        table.add_column(column, justify="right")
    for key, stats in rows:
        table.add_row(_series_label(key), *(_percent(stats[s]) for s in _STATS))
    return table


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} %"


def comparison_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title=f"lm loss against {escape(rows[0]['baseline'])} (negative = lower)",
                  header_style="bold", title_justify="left")
    for column in ("run", "lm loss (mean last 10%)", "Δ", "val lm loss (last)", "Δ"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for row in rows:
        table.add_row(escape(row["run"]), _num(row["lm_loss_mean_last_10pct"]),
                      _signed(row["lm_loss_mean_last_10pct_delta"]),
                      _num(row["val_lm_loss_last"]), _signed(row["val_lm_loss_last_delta"]))
    return table


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.4f}"


def render_report(console: Console, report: Report) -> None:
    payload = report.as_dict()
    for run in payload["runs"]:
        console.print(run_table(run))
        acceptance = acceptance_table(run)
        if acceptance is not None:
            console.print(acceptance)
        speed = run["throughput"]
        facts = [f"tokens/s (mean last 10%) {_num(speed['tokens_per_s_mean_last_10pct'], 1)}"]
        if speed["peak_memory_mb"] is not None:
            facts.append(f"peak memory {_num(speed['peak_memory_mb'], 1)} MB")
        console.print("  " + " · ".join(facts), highlight=False)
        if run.get("eval"):
            render_eval_summary(console, run["eval"])
    if payload["comparison"]:
        console.print(comparison_table(payload["comparison"]))
    for path in payload["plots"]:
        console.print(f"wrote {escape(path)}", highlight=False, soft_wrap=True)
