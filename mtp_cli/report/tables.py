"""Per-run tables for `mtp report`: lm loss, each depth's loss and acceptance rate.

Each training series gets `first`, `last`, `min` and `mean_last_10pct` (the mean over the last
10% of its logged steps, at least one: less noisy than `last` for comparing runs). Validation
series get `first`, `last`, `min`. Runs are compared with the first one named.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from mtp_cli.report.evals import latest_eval
from mtp_cli.report.metrics import RunMetrics

TAIL_FRACTION = 0.1


def series_stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    tail = values[-max(1, math.ceil(len(values) * TAIL_FRACTION)):]
    return {"first": values[0], "last": values[-1], "min": min(values),
            "mean_last_10pct": sum(tail) / len(tail)}


def _val_stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"first": values[0], "last": values[-1], "min": min(values)}


def train_keys(depths: int) -> list[str]:
    keys = ["lm_loss"]
    for k in range(1, depths + 1):
        keys += [f"mtp_{k}_loss", f"mtp_{k}_acceptance_rate",
                 f"mtp_{k}_cumulative_acceptance_rate"]
    return keys


def val_keys(depths: int) -> list[str]:
    return ["val_lm_loss", *[f"val_mtp_{k}_loss" for k in range(1, depths + 1)]]


@dataclass
class RunSummary:
    label: str
    metrics: RunMetrics

    def as_dict(self) -> dict[str, Any]:
        m = self.metrics
        depths = m.mtp_depths
        train = {k: s for k in train_keys(depths) if (s := series_stats(m.series(k)[1]))}
        val = {k: s for k in val_keys(depths) if (s := _val_stats(m.series(k, split="val")[1]))}
        last = m.train[-1] if m.train else (m.val[-1] if m.val else {})
        _, speed = m.series("tokens_per_s")
        _, memory = m.series("peak_memory_mb")
        speed_stats = series_stats(speed)
        return {
            "run": str(m.run_dir), "label": self.label, "mtp_depths": depths,
            "lines": {"train": len(m.train), "val": len(m.val), "broken": m.broken_lines},
            "steps": last.get("step"), "tokens": last.get("tokens"),
            "train": train, "validation": val,
            "eval": latest_eval(m.run_dir, m.warnings),
            "throughput": {
                "tokens_per_s_mean_last_10pct": speed_stats["mean_last_10pct"]
                if speed_stats else None,
                "tokens_per_s_mean": sum(speed) / len(speed) if speed else None,
                "peak_memory_mb": max(memory) if memory else None,
            },
        }


def run_labels(metrics: list[RunMetrics]) -> list[str]:
    """Directory names, made unique with their parents when two runs share one; plus D."""
    names = [m.run_dir.resolve().name or str(m.run_dir) for m in metrics]
    if len(set(names)) < len(names):
        names = [str(m.run_dir) for m in metrics]
    return [f"{name} (D={m.mtp_depths})" for name, m in zip(names, metrics, strict=True)]


def compare_runs(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each run's lm loss against the first run's: negative delta = lower main loss."""
    if len(summaries) < 2:
        return []
    base = summaries[0]

    def pick(summary: dict[str, Any], section: str, key: str, stat: str) -> float | None:
        return (summary[section].get(key) or {}).get(stat)

    rows = []
    for other in summaries[1:]:
        row: dict[str, Any] = {"run": other["label"], "baseline": base["label"]}
        for name, section, key, stat in (
            ("lm_loss_mean_last_10pct", "train", "lm_loss", "mean_last_10pct"),
            ("val_lm_loss_last", "validation", "val_lm_loss", "last"),
        ):
            a, b = pick(other, section, key, stat), pick(base, section, key, stat)
            row[name] = a
            row[f"{name}_delta"] = a - b if a is not None and b is not None else None
        rows.append(row)
    return rows
