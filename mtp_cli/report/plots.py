"""PNG plots for `mtp report`: losses per depth against steps and tokens, runs overlaid.

Matplotlib's object API with the Agg canvas: no pyplot, no global backend switch, no display.
Each run keeps one colour in every panel. Long, noisy series are drawn faint with a moving
average on top, labelled "(smoothed)" (the caption gives the window); the choice is made once
per figure from its longest series, so every run in a figure is smoothed the same way (a 20-step
run beside a 300-step one is not drawn raw against a moving average). Step axes tick at integers. With several runs, an
extra panel shows each run's lm loss minus the first run's at the same steps: the direct answer
to "does MTP (D=1) lower the main loss of D=0?". Axes carry their units: losses are
cross-entropies in nats per token, acceptance rates percentages. Files are written atomically
(temp file, then `os.replace`) with the mode any other file gets (0644 under the usual umask).
"""

from __future__ import annotations

import math
import os
import secrets
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, MaxNLocator

from mtp_cli.report.metrics import RunMetrics

PLOT_NAMES = {
    "step": "report_loss_vs_steps.png",
    "tokens": "report_loss_vs_tokens.png",
    "acceptance": "report_acceptance_vs_steps.png",
    "moe": "report_moe_vs_steps.png",
}
# MoE metrics (mtp_cli.train.moe_metrics): Megatron's aux-loss names and the load imbalance
MOE_KEYS = ("load_balancing_loss", "seq_load_balancing_loss", "z_loss", "load_imbalance")
SMOOTH_ABOVE = 40  # points; longer series get a moving average


LOSS_UNIT = "loss (nats/token)"
ACCEPTANCE_UNIT = "acceptance rate (%)"


def _window(count: int) -> int:
    return max(2, count // 25)


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


class _Smoothed:
    """The moving-average windows used on each figure, for its caption."""

    def __init__(self) -> None:
        self.windows: dict[int, set[int]] = {}

    def add(self, figure: Figure, window: int) -> None:
        self.windows.setdefault(id(figure), set()).add(window)

    def caption(self, figure: Figure) -> str:
        windows = sorted(self.windows.pop(id(figure), set()))
        if not windows:
            return ""
        sizes = "/".join(str(w) for w in windows)
        return f"\n(smoothed): moving average of {sizes} logged points; faint lines: raw values"


SMOOTHED = _Smoothed()


def figure_window(lengths: list[int]) -> int | None:
    """The moving-average window for every series of one figure (None: all drawn raw), from
    the longest: one rule for all runs, so identical runs look identical."""
    longest = max(lengths, default=0)
    return _window(longest) if longest > SMOOTH_ABOVE else None


def _series_window(runs: list[RunMetrics], keys: list[str]) -> int | None:
    return figure_window([len(run.series(key)[0]) for run in runs for key in keys])


def _draw(axes, xs: list, ys: list, color: str, label: str, *, style: str = "-",
          window: int | None = None) -> None:
    if not xs:
        return
    if window is not None:
        axes.plot(xs, ys, style, color=color, alpha=0.25, linewidth=0.8)
        axes.plot(xs, _moving_average(ys, window), style, color=color, linewidth=1.6,
                  label=f"{label} (smoothed)")
        SMOOTHED.add(axes.figure, window)
    else:
        axes.plot(xs, ys, style, color=color, linewidth=1.4, marker=".", markersize=4,
                  label=label)


def _grid(panels: int) -> tuple[Figure, list]:
    cols = min(3, panels)
    rows = math.ceil(panels / cols)
    figure = Figure(figsize=(5.2 * cols, 3.8 * rows), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    axes = [figure.add_subplot(rows, cols, i + 1) for i in range(panels)]
    return figure, axes


def _colors(count: int) -> list[str]:
    return [f"C{i % 10}" for i in range(count)]


def _integer_steps(axes) -> None:
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))


def _difference(base: RunMetrics, run: RunMetrics) -> tuple[list, list]:
    """run's lm loss minus base's at the steps both logged."""
    base_xs, base_ys = base.series("lm_loss")
    at = dict(zip(base_xs, base_ys, strict=True))
    xs, ys = run.series("lm_loss")
    pairs = [(x, y - at[x]) for x, y in zip(xs, ys, strict=True) if x in at]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def loss_figure(runs: list[RunMetrics], labels: list[str], x: str) -> Figure:
    depths = max(run.mtp_depths for run in runs)
    keys = ["lm_loss", *[f"mtp_{k}_loss" for k in range(1, depths + 1)]]
    compare = len(runs) > 1 and x == "step"
    figure, axes = _grid(len(keys) + (1 if compare else 0))
    x_label = "step" if x == "step" else "tokens seen"
    window = _series_window(runs, keys)
    for ax, key in zip(axes, keys, strict=False):
        for run, label, color in zip(runs, labels, _colors(len(runs)), strict=True):
            _draw(ax, *run.series(key, x), color, label, window=window)
            vx, vy = run.series(f"val_{key}", x, split="val")
            if vx:
                ax.plot(vx, vy, "o--", color=color, markersize=5, linewidth=1,
                        label=f"{label} val")
        title = "lm loss" if key == "lm_loss" else key.replace("_loss", " loss")
        ax.set_title(title)
        ax.set_xlabel(x_label)
        ax.set_ylabel(LOSS_UNIT)
        if x == "tokens":
            ax.xaxis.set_major_formatter(EngFormatter())
        else:
            _integer_steps(ax)
    if compare:
        ax = axes[len(keys)]
        ax.axhline(0.0, color="0.5", linewidth=0.8)
        for run, label, color in zip(runs[1:], labels[1:], _colors(len(runs))[1:], strict=True):
            _draw(ax, *_difference(runs[0], run), color, f"{label} − {labels[0]}",
                  window=window)
        ax.set_title(f"lm loss minus {labels[0]} (below 0 = lower)")
        ax.set_xlabel("step")
        ax.set_ylabel("Δ lm loss (nats/token)")
        _integer_steps(ax)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    figure.suptitle(f"losses vs {x_label}: " + ", ".join(labels) + SMOOTHED.caption(figure),
                    fontsize=10)
    return figure


def acceptance_figure(runs: list[RunMetrics], labels: list[str]) -> Figure | None:
    depths = max(run.mtp_depths for run in runs)
    if depths == 0:
        return None
    figure, axes = _grid(depths)
    window = _series_window(runs, [f"mtp_{k}_{kind}acceptance_rate" for k in range(1, depths + 1)
                                   for kind in ("", "cumulative_")])
    for k, ax in enumerate(axes, start=1):
        for run, label, color in zip(runs, labels, _colors(len(runs)), strict=True):
            _draw(ax, *run.series(f"mtp_{k}_acceptance_rate"), color, label, window=window)
            _draw(ax, *run.series(f"mtp_{k}_cumulative_acceptance_rate"), color,
                  f"{label} cumulative", style="--", window=window)
        ax.set_title(f"mtp_{k} acceptance rate")
        ax.set_xlabel("step")
        _integer_steps(ax)
        ax.set_ylabel(ACCEPTANCE_UNIT)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    caption = SMOOTHED.caption(figure)
    if caption:
        figure.suptitle(caption.strip(), fontsize=9)
    return figure


def moe_figure(runs: list[RunMetrics], labels: list[str]) -> Figure | None:
    """One panel per MoE metric any run logged: the aux losses (divided by their coefficients,
    as Megatron logs them) and the load imbalance (max tokens on an expert / mean)."""
    keys = [key for key in MOE_KEYS if any(run.series(key)[0] for run in runs)]
    if not keys:
        return None
    figure, axes = _grid(len(keys))
    window = _series_window(runs, keys)
    for key, ax in zip(keys, axes, strict=True):
        for run, label, color in zip(runs, labels, _colors(len(runs)), strict=True):
            _draw(ax, *run.series(key), color, label, window=window)
        ax.set_title(key.replace("_", " "))
        ax.set_xlabel("step")
        _integer_steps(ax)
        ax.set_ylabel("max / mean tokens per expert" if key == "load_imbalance"
                      else "loss / coefficient")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    caption = SMOOTHED.caption(figure)
    figure.suptitle("MoE router metrics" + caption, fontsize=9)
    return figure


def _save(figure: Figure, path: Path) -> None:
    """Atomically, with the mode a plain `open` would give (mkstemp's is 0600)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        figure.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_plots(runs: list[RunMetrics], labels: list[str], out_dir: Path) -> list[Path]:
    """The report's PNGs in `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {"step": loss_figure(runs, labels, "step"),
               "tokens": loss_figure(runs, labels, "tokens"),
               "acceptance": acceptance_figure(runs, labels),
               "moe": moe_figure(runs, labels)}
    written = []
    for key, figure in figures.items():
        if figure is not None:
            path = out_dir / PLOT_NAMES[key]
            _save(figure, path)
            written.append(path)
    return written
