"""What a sweep directory says: per cell, mean +- std over seeds of the main head's held-out
loss at equal training tokens (`mtp eval` of each final checkpoint: the MTP heads play no part
in it) and at equal wall-clock time (the training validation curve read at the shortest run's
end, timeline.py), the difference to the baseline cell (the grid's first) with its 95%
interval and Welch's p, MTP acceptance per depth, tokens per round and the measured decoding
speed-up. Read from the run directories every time, so `mtp report DIR` of a half-finished
sweep shows what there is; written to DIR/sweep.json by `mtp sweep`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mtp_cli.errors import UserError
from mtp_cli.report.evals import latest_eval
from mtp_cli.report.metrics import read_metrics
from mtp_cli.sweep.grid import Cell, Grid, Vary
from mtp_cli.sweep.stats import mean_std, welch
from mtp_cli.sweep.timeline import end_seconds, loss_at_time, val_curve

PLAN_FILE = "sweep_plan.json"
SWEEP_FILE = "sweep.json"
PROBE_FILE = "probe.json"
PLOT_FILE = "sweep.png"


def run_dir_of(out: Path, cell: Cell, seed: int) -> Path:
    return out / cell.slug / f"seed{seed}"


def read_plan(out: Path) -> Grid | None:
    path = out / PLAN_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        varies = [Vary(str(key), tuple(str(v) for v in values)) for key, values in data["vary"]]
        return Grid(Path(data["spec"]), varies, int(data["seeds"]), list(data.get("set", [])))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path}: not a sweep plan as mtp sweep writes it ({error})") from None


def _run_record(run_dir: Path, seed: int) -> dict[str, Any]:
    record: dict[str, Any] = {"seed": seed, "run_dir": str(run_dir), "eval": None,
                              "probe": None, "curve": [], "end_seconds": None, "tokens": None}
    if not (run_dir / "metrics.jsonl").is_file():
        return record
    try:
        metrics = read_metrics(run_dir)
    except UserError:
        return record
    record["curve"] = val_curve(metrics.train, metrics.val)
    record["token_curve"] = [(line["tokens"], line["val_lm_loss"]) for line in metrics.val
                             if isinstance(line.get("val_lm_loss"), int | float)
                             and isinstance(line.get("tokens"), int | float)]
    record["end_seconds"] = end_seconds(metrics.train)
    record["tokens"] = metrics.train[-1].get("tokens") if metrics.train else None
    record["eval"] = latest_eval(run_dir)
    probe = run_dir / PROBE_FILE
    if probe.is_file():
        try:
            record["probe"] = json.loads(probe.read_text())
        except (OSError, ValueError):
            record["probe"] = None
    return record


def _summary(values: list[float]) -> dict[str, Any]:
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "n": len(values), "values": values}


def _numbers(runs: list[dict[str, Any]], get: Any) -> list[float]:
    out = []
    for run in runs:
        try:
            value = get(run)
        except (KeyError, TypeError, IndexError):
            value = None
        if isinstance(value, int | float):
            out.append(float(value))
    return out


def _cell_summary(cell: Cell, runs: list[dict[str, Any]], at: float | None) -> dict[str, Any]:
    for run in runs:
        run["loss_at_time"] = loss_at_time(run["curve"], at) if at is not None else None
    depths = max((len((run["eval"] or {}).get("depths") or []) for run in runs), default=0)
    acceptance = [_summary(_numbers(runs, lambda r, k=k: r["eval"]["depths"][k][
        "speculative_acceptance_rate"])) for k in range(depths)]
    return {
        "name": cell.name, "settings": [list(s) for s in cell.settings],
        "loss_equal_tokens": _summary(_numbers(runs, lambda r: r["eval"]["lm_loss"])),
        "loss_equal_time": _summary(_numbers(runs, lambda r: r["loss_at_time"])),
        "end_seconds": _summary(_numbers(runs, lambda r: r["end_seconds"])),
        "acceptance_per_depth": acceptance,
        "tokens_per_round": _summary(_numbers(
            runs, lambda r: r["probe"]["speculative"]["mean_accepted_length"])),
        "speedup": _summary(_numbers(runs, lambda r: r["probe"]["speedup"])),
        "runs": [{k: v for k, v in run.items() if k not in ("curve", "token_curve")}
                 for run in runs],
    }


def _versus(cell: dict[str, Any], base: dict[str, Any], key: str) -> dict[str, Any] | None:
    a, b = cell[key]["values"], base[key]["values"]
    return welch(a, b).as_dict() if a and b else None


def summarize(out: Path, grid: Grid | None = None, budget: str = "tokens") -> dict[str, Any]:
    """The sweep's figures (module doc), with each run's curves for the plot under `curves`."""
    out = Path(out)
    grid = grid or read_plan(out)
    if grid is None:
        raise UserError(f"{out}: no {PLAN_FILE} (not a directory mtp sweep wrote)")
    cells = grid.cells
    runs = {cell: [_run_record(run_dir_of(out, cell, s), s) for s in range(grid.seeds)]
            for cell in cells}
    ends = [r["end_seconds"] for rs in runs.values() for r in rs if r["end_seconds"]]
    at = min(ends) if ends else None
    summaries = [_cell_summary(cell, runs[cell], at) for cell in cells]
    base = summaries[0]
    for summary in summaries:
        summary["vs_baseline"] = {
            "equal_tokens": _versus(summary, base, "loss_equal_tokens"),
            "equal_time": _versus(summary, base, "loss_equal_time"),
        } if summary is not base else None
    curves = {cell.name: [{"seed": r["seed"], "time": r["curve"],
                           "tokens": r.get("token_curve", [])} for r in runs[cell]]
              for cell in cells}
    return {"plan": grid.as_dict(), "budget": budget, "baseline": base["name"],
            "equal_time_seconds": at, "cells": summaries, "curves": curves,
            "complete": all(r["eval"] is not None for rs in runs.values() for r in rs)}


def write_summary(out: Path, summary: dict[str, Any]) -> Path:
    from mtp_cli.checkpoint.publish import atomic_write_text

    path = Path(out) / SWEEP_FILE
    atomic_write_text(path, json.dumps(summary, indent=1) + "\n")
    return path
