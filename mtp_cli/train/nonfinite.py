"""Non-finite steps: never applied, then stopped (`train.nonfinite: stop`) or skipped
(`skip_step`, at most `train.nonfinite_max_skips` in a row); JSON that stays JSON.

Every rank judges a step from the same globally reduced numbers (the global batch's lm loss, the
total gradient norm over every shard and stage), so all ranks take the same decision and no rank
is left waiting in a collective. A non-finite gradient norm also catches a non-finite MTP loss.
"""

from __future__ import annotations

import math
from typing import Any

from mtp_cli.train.stops import NonFiniteStop


def update_is_finite(lm_loss: float, grad_norm: float) -> bool:
    """Whether a step's update may be applied: its loss and gradient norm are finite."""
    return math.isfinite(lm_loss) and math.isfinite(grad_norm)


def finite_json(record: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """`record` with non-finite floats as None (JSON has no NaN), and whether there were any."""
    found = False
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            value, inner = finite_json(value)
            found |= inner
        elif isinstance(value, float) and not math.isfinite(value):
            value, found = None, True
        out[key] = value
    return out, found


class NonFiniteGuard:
    """Decides what a non-finite step does; counts consecutive skips."""

    def __init__(self, mode: str, max_skips: int) -> None:
        self.mode, self.max_skips = mode, max_skips
        self.in_a_row = 0

    def check(self, step: int, lm_loss: float, grad_norm: float) -> bool:
        """False for a finite step; True for a skipped one; `NonFiniteStop` to stop."""
        if update_is_finite(lm_loss, grad_norm):
            self.in_a_row = 0
            return False
        kind = "gradient norm" if math.isfinite(lm_loss) else "loss"
        what = f"non-finite {kind} at step {step}: lm_loss {lm_loss}, grad_norm {grad_norm}"
        if self.mode == "stop":
            raise NonFiniteStop(f"{what} (train.nonfinite: stop); its update was not applied "
                                "and no checkpoint of it was written")
        if self.in_a_row >= self.max_skips:
            raise NonFiniteStop(f"{what}, after {self.in_a_row} skipped steps in a row "
                                f"(train.nonfinite_max_skips {self.max_skips}); no checkpoint "
                                "of it was written")
        self.in_a_row += 1
        return True
