"""Wall-clock seconds of a run from its metrics.jsonl `time` stamps, and a held-out loss read at
a given elapsed time (the "equal time" comparison of `mtp sweep`).

Elapsed seconds at a logged step: the first logged line counts its own steps at the first
interval's pace (the run's start-up, which differs by machine load, not by model, is left out);
after it, the difference of consecutive `time` stamps. A difference far beyond what the line's
own `tokens_per_s` accounts for (more than GAP_FACTOR times it plus GAP_SLACK seconds: a
resumed run's restart, a stopped job) counts only the training time `tokens_per_s` gives.
Validation points (at steps, no stamp) take the elapsed time of their step, interpolated
between the logged lines around it; a loss at time T is the linear interpolation of the
validation points around T (None outside the run's validated span).
"""

from __future__ import annotations

import bisect
import itertools
from typing import Any

GAP_FACTOR = 3.0
GAP_SLACK = 30.0


def _interval_estimate(line: dict[str, Any], previous_tokens: float) -> float | None:
    rate = line.get("tokens_per_s")
    tokens = line.get("tokens")
    if not isinstance(rate, int | float) or rate <= 0 or not isinstance(tokens, int | float):
        return None
    return (tokens - previous_tokens) / rate


def elapsed_by_step(train: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, elapsed seconds) of every training line with a step and a time (module doc)."""
    lines = [line for line in train if isinstance(line.get("time"), int | float)
             and isinstance(line.get("step"), int) and not line.get("nonfinite")]
    if not lines:
        return []
    out: list[tuple[int, float]] = []
    first = lines[0]
    if len(lines) > 1:
        pace = (lines[1]["time"] - first["time"]) / max(1, lines[1]["step"] - first["step"])
        start = pace * first["step"]
    else:
        start = _interval_estimate(first, 0.0) or 0.0
    out.append((first["step"], start))
    for previous, line in itertools.pairwise(lines):
        gap = line["time"] - previous["time"]
        estimate = _interval_estimate(line, previous.get("tokens", 0))
        if estimate is not None and gap > GAP_FACTOR * estimate + GAP_SLACK:
            gap = estimate
        out.append((line["step"], out[-1][1] + max(0.0, gap)))
    return out


def interpolate(xs: list[float], ys: list[float], x: float) -> float | None:
    """Linear interpolation of (xs ascending, ys) at x; None outside [xs[0], xs[-1]]."""
    if not xs or x < xs[0] or x > xs[-1]:
        return None
    i = bisect.bisect_left(xs, x)
    if xs[i] == x:
        return ys[i]
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def val_curve(train: list[dict[str, Any]], val: list[dict[str, Any]],
              key: str = "val_lm_loss") -> list[tuple[float, float]]:
    """(elapsed seconds, `key`) of every validation point whose step the clock covers; the
    last point of a step wins (a resumed run may repeat one)."""
    clock = elapsed_by_step(train)
    steps, seconds = [float(s) for s, _ in clock], [t for _, t in clock]
    by_step: dict[int, float] = {}
    for line in val:
        if isinstance(line.get("step"), int) and isinstance(line.get(key), int | float):
            by_step[line["step"]] = float(line[key])
    points = []
    for step in sorted(by_step):
        at = interpolate(steps, seconds, float(step))
        if at is not None:
            points.append((at, by_step[step]))
    return points


def end_seconds(train: list[dict[str, Any]]) -> float | None:
    clock = elapsed_by_step(train)
    return clock[-1][1] if clock else None


def loss_at_time(curve: list[tuple[float, float]], seconds: float) -> float | None:
    return interpolate([t for t, _ in curve], [v for _, v in curve], seconds)
