"""metrics.jsonl files with known values, for the report tests."""

from __future__ import annotations

import json
import math
from pathlib import Path

STEPS = 50
TOKENS_PER_STEP = 1024


def metrics_lines(depths: int, offset: float) -> tuple[list[dict], list[dict]]:
    train, val = [], []
    for step in range(1, STEPS + 1):
        line = {"step": step, "tokens": step * TOKENS_PER_STEP,
                "lm_loss": 2.0 + 3.0 * math.exp(-step / 15) + 0.05 * math.sin(step) + offset,
                "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1000.0 + step,
                "peak_memory_mb": 100.0 + step % 7, "mtp_loss_scale": 0.1, "time": 0.5}
        for k in range(1, depths + 1):
            line[f"mtp_{k}_loss"] = line["lm_loss"] + 0.3 * k
            line[f"mtp_{k}_acceptance_rate"] = min(1.0, 0.1 + step / 100 / k)
            line[f"mtp_{k}_cumulative_acceptance_rate"] = 0.05 + step / 200 / k
        train.append(line)
        if step % 25 == 0:
            entry = {"step": step, "tokens": step * TOKENS_PER_STEP, "split": "val",
                     "val_lm_loss": line["lm_loss"] + 0.1}
            for k in range(1, depths + 1):
                entry[f"val_mtp_{k}_loss"] = line[f"mtp_{k}_loss"] + 0.1
            val.append(entry)
    return train, val


def write_run(run_dir: Path, depths: int, offset: float = 0.0, tail: str = "") -> list[dict]:
    """metrics.jsonl with validation lines interleaved; returns the training lines."""
    run_dir.mkdir(parents=True)
    train, val = metrics_lines(depths, offset)
    lines = []
    for entry in train:
        lines.append(json.dumps(entry))
        lines += [json.dumps(v) for v in val if v["step"] == entry["step"]]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n" + tail)
    return train
