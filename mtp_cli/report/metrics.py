"""Read a run's `metrics.jsonl`, keeping every complete line.

A run killed mid-write leaves a partial last line; it (and any other line that is not a JSON
object) is skipped with a warning naming the file and line, so a report still covers everything
the run logged before it died.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtp_cli.errors import UserError

METRICS_FILE = "metrics.jsonl"
_MTP_LOSS = re.compile(r"^mtp_(\d+)_loss$")


@dataclass
class RunMetrics:
    run_dir: Path
    train: list[dict[str, Any]]  # training lines, in file order
    val: list[dict[str, Any]]  # validation lines (`"split": "val"`)
    warnings: list[str] = field(default_factory=list)
    broken_lines: list[int] = field(default_factory=list)  # 1-based line numbers

    @property
    def mtp_depths(self) -> int:
        """D, from the `mtp_{k}_loss` keys the run logged."""
        depths = [int(m.group(1)) for line in self.train for key in line
                  if (m := _MTP_LOSS.match(key))]
        return max(depths, default=0)

    def series(self, key: str, x: str = "step", split: str = "train") -> tuple[list, list]:
        """(xs, ys) of the lines that hold both `x` and a numeric `key`."""
        lines = self.train if split == "train" else self.val
        points = [(line[x], line[key]) for line in lines
                  if _is_number(line.get(key)) and _is_number(line.get(x))]
        return [p[0] for p in points], [p[1] for p in points]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def read_metrics(run_dir: Path) -> RunMetrics:
    """Every complete line of `RUN_DIR/metrics.jsonl`. UserError when there are none."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise UserError(f"{run_dir}: no such run directory")
    path = run_dir / METRICS_FILE if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise UserError(f"{run_dir}: no {METRICS_FILE} (not a run directory?)")
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        raise UserError(f"{path}: cannot be read ({error.strerror})") from None
    metrics = RunMetrics(run_dir if run_dir.is_dir() else run_dir.parent, [], [])
    lines = text.split("\n")
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            line = None
        if not isinstance(line, dict):
            last = number == len(lines) or all(not rest.strip() for rest in lines[number:])
            why = "incomplete last line (run killed mid-write?)" if last else "not a JSON object"
            metrics.warnings.append(f"{path}:{number}: {why}; skipped")
            metrics.broken_lines.append(number)
            continue
        (metrics.val if line.get("split") == "val" else metrics.train).append(line)
    if not metrics.train and not metrics.val:
        raise UserError(f"{path}: no complete metrics lines")
    return metrics
