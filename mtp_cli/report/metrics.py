"""Read a run's `metrics.jsonl`, keeping every complete line, in bounded memory and time.

A run killed mid-write leaves a partial last line; it (and any other line that is not a JSON
object) is skipped with a warning naming the file and line, so a report still covers everything
the run logged before it died. A hand-edited or hostile file cannot make the report blow up:
lines longer than `MAX_LINE_BYTES` or nested too deeply are skipped with a warning; integers too
large for a float and non-finite numbers are dropped from the series with a warning; MTP keys of
depths past `MAX_REPORT_DEPTH` (`mtp_100000000_loss`) are ignored with a warning instead of
making a table row and a plot panel per depth. Only top-level numbers (and the `split` tag) are
kept per line.
"""

from __future__ import annotations

import json
import math
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtp_cli.errors import UserError

METRICS_FILE = "metrics.jsonl"
MAX_LINE_BYTES = 1 << 20  # a metrics line of D = 100 is about 10 KB
MAX_REPORT_DEPTH = 100
_MTP_KEY = re.compile(r"^(?:val_)?mtp_(\d+)_")
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
        """D, from the `mtp_{k}_loss` keys the run logged (depths past the limit were dropped)."""
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


def _usable(value: Any) -> tuple[Any, str | None]:
    """(value kept, why it was dropped): numbers must be finite floats (ints that fit one)."""
    if not _is_number(value):
        return value, None
    try:
        as_float = float(value)
    except OverflowError:
        return None, "integer too large for a float"
    if not math.isfinite(as_float):
        return None, "not a finite number"
    return value, None


class _TooLarge:
    """Stands in for a JSON integer of hundreds of digits (Python refuses to parse past 4,300,
    and nothing past 309 fits a float)."""


def _parse_int(text: str) -> int | _TooLarge:
    return int(text) if len(text) <= 400 else _TooLarge()


def _reduce(record: dict[str, Any], where: str, warnings: _Warnings) -> dict[str, Any]:
    """The line's top-level numbers and `split`, with bad numbers and depths dropped."""
    kept: dict[str, Any] = {}
    for key, value in record.items():
        if key == "split" and isinstance(value, str):
            kept[key] = value[:20]
            continue
        if isinstance(value, _TooLarge):
            warnings.append(f"{where}: {key[:60]!r}: integer too large for a float; ignored")
            continue
        if not _is_number(value):
            continue
        depth = _MTP_KEY.match(key)
        if depth and (len(depth.group(1)) > 4 or int(depth.group(1)) > MAX_REPORT_DEPTH):
            warnings.append(f"{where}: key {key[:60]!r}: MTP depth past {MAX_REPORT_DEPTH}; "
                            "ignored")
            continue
        value, why = _usable(value)
        if why is not None:
            warnings.append(f"{where}: {key[:60]!r}: {why}; ignored")
            continue
        kept[key] = value
    return kept


def _numbered_lines(handle: Any) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, line, complete) of a file, read in bounded pieces: a line past
    `MAX_LINE_BYTES` comes back cut at that length (it will not parse) and its rest is skipped."""
    number = 0
    while True:
        raw = handle.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        number += 1
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            while (rest := handle.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                pass
            yield number, raw, True
            continue
        yield number, raw, raw.endswith(b"\n")


class _Warnings:
    """A file's warnings, at most `MAX_WARNINGS` of them, then a count of the rest."""

    MAX_WARNINGS = 20

    def __init__(self, path: Path) -> None:
        self.path, self.lines, self.dropped = path, [], 0

    def append(self, text: str) -> None:
        if len(self.lines) < self.MAX_WARNINGS:
            self.lines.append(text)
        else:
            self.dropped += 1

    def done(self) -> list[str]:
        more = [f"{self.path}: {self.dropped:,} more warnings"] if self.dropped else []
        return self.lines + more


def read_metrics(run_dir: Path) -> RunMetrics:
    """Every complete line of `RUN_DIR/metrics.jsonl`. UserError when there are none."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise UserError(f"{run_dir}: no such run directory")
    path = run_dir / METRICS_FILE if run_dir.is_dir() else run_dir
    if not path.exists():
        raise UserError(f"{run_dir}: no {METRICS_FILE} (not a run directory?)")
    if not stat.S_ISREG(path.stat().st_mode):
        raise UserError(f"{path}: not a regular file")
    metrics = RunMetrics(run_dir if run_dir.is_dir() else run_dir.parent, [], [])
    warnings = _Warnings(path)
    try:
        with open(path, "rb") as handle:
            for number, raw, complete in _numbered_lines(handle):
                if raw.strip():
                    _read_line(metrics, warnings, f"{path}:{number}", number, raw, complete)
    except OSError as error:
        raise UserError(f"{path}: cannot be read ({error.strerror})") from None
    metrics.warnings = warnings.done()
    if not metrics.train and not metrics.val:
        raise UserError(f"{path}: no complete metrics lines")
    return metrics


def _read_line(metrics: RunMetrics, warnings: _Warnings, where: str, number: int, raw: bytes,
               complete: bool) -> None:
    """One line into `metrics` (a training or validation line), or a warning."""
    why = "not a JSON object"
    if len(raw) > MAX_LINE_BYTES:
        line, why = None, f"longer than {MAX_LINE_BYTES:,} bytes"
    else:
        try:
            line = json.loads(raw.decode("utf-8", errors="replace"), parse_int=_parse_int)
        except RecursionError:
            line, why = None, "nested too deeply"
        except ValueError:
            line = None
    if not isinstance(line, dict):
        if not complete and why == "not a JSON object":
            why = "incomplete last line (run killed mid-write?)"
        warnings.append(f"{where}: {why}; skipped")
        metrics.broken_lines.append(number)
        return
    line = _reduce(line, where, warnings)
    (metrics.val if line.get("split") == "val" else metrics.train).append(line)
