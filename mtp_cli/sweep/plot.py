"""The sweep's PNG: the training validation loss of the main head against training tokens and
against elapsed wall-clock seconds, each cell's mean over seeds with a band of +- one standard
deviation (seeds' curves read at common x values, by linear interpolation inside each seed's
span), and a dotted line at the equal-time point. Matplotlib's Agg canvas, no pyplot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

from mtp_cli.sweep.stats import mean_std
from mtp_cli.sweep.timeline import interpolate

POINTS = 60


def band(seeds: list[list[tuple[float, float]]]) -> tuple[list[float], list[float], list[float]]:
    """(xs, mean, std) over seeds at POINTS x values spanning what every seed covers."""
    seeds = [s for s in seeds if len(s) >= 2]
    if not seeds:
        return [], [], []
    low, high = max(s[0][0] for s in seeds), min(s[-1][0] for s in seeds)
    if high <= low:
        return [], [], []
    xs = [low + (high - low) * i / (POINTS - 1) for i in range(POINTS)]
    means, stds = [], []
    for x in xs:
        values = [interpolate([p[0] for p in s], [p[1] for p in s], x) for s in seeds]
        mean, std = mean_std([v for v in values if v is not None])
        means.append(mean if mean is not None else float("nan"))
        stds.append(std or 0.0)
    return xs, means, stds


def sweep_figure(summary: dict[str, Any]) -> Figure:
    figure = Figure(figsize=(11, 4.2), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    by_tokens, by_time = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    for i, (name, seeds) in enumerate(summary["curves"].items()):
        color = f"C{i % 10}"
        for axes, key in ((by_tokens, "tokens"), (by_time, "time")):
            xs, means, stds = band([[tuple(p) for p in s[key]] for s in seeds])
            if not xs:
                continue
            axes.plot(xs, means, color=color, linewidth=1.5, label=f"{name} (n={len(seeds)})")
            axes.fill_between(xs, [m - s for m, s in zip(means, stds, strict=True)],
                              [m + s for m, s in zip(means, stds, strict=True)],
                              color=color, alpha=0.2, linewidth=0)
    at = summary.get("equal_time_seconds")
    if at:
        by_time.axvline(at, color="0.4", linestyle=":", linewidth=1, label="equal time")
    by_tokens.set_xlabel("training tokens")
    by_tokens.xaxis.set_major_formatter(EngFormatter())
    by_time.set_xlabel("elapsed wall-clock seconds (logged)")
    for axes in (by_tokens, by_time):
        axes.set_ylabel("validation lm loss (nats/token)")
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=7)
    figure.suptitle("main-head validation loss, mean over seeds +- 1 std (bands)", fontsize=10)
    return figure


def write_sweep_png(summary: dict[str, Any], path: Path) -> Path:
    import os
    import secrets

    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        sweep_figure(summary).savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
