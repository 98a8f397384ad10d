"""Training progress for people, on global rank 0: a rich live display on a terminal, plain log
lines otherwise (files, CI logs, pipes), both showing step, lm loss, each mtp_k loss, the MoE
aux losses and load imbalance (MoE models), tokens/s and the time left."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

# MoE metrics shown on the line when logged (mtp_cli.train.moe_metrics.MOE_METRIC_NAMES)
PROGRESS_MOE_NAMES = ("load_balancing_loss", "seq_load_balancing_loss", "z_loss",
                      "load_imbalance")


def format_duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def summary_text(record: dict[str, Any], depths: int) -> str:
    """`lm 2.345 | mtp_1 2.811 | mtp_2 3.020 | 12.3k tok/s` from a metrics record."""
    parts = [f"lm {record['lm_loss']:.4f}"]
    parts += [f"mtp_{k} {record[f'mtp_{k}_loss']:.4f}" for k in range(1, depths + 1)
              if f"mtp_{k}_loss" in record]
    parts += [f"{name} {record[name]:.4g}" for name in PROGRESS_MOE_NAMES if name in record]
    parts.append(f"{record['tokens_per_s'] / 1000:.1f}k tok/s")
    if "tflops_per_device" in record:
        rate = f"{record['tflops_per_device']:.3g} TFLOP/s"
        parts.append(f"{rate} (MFU {record['mfu']:.1%})" if "mfu" in record else rate)
    return " | ".join(parts)


class ProgressReporter:
    """Step progress: `update` after each logged step, `note` for events (eval, checkpoint)."""

    def __init__(self, total_steps: int, start_step: int, depths: int, *,
                 live: bool | None = None) -> None:
        self.total, self.start, self.depths = total_steps, start_step, depths
        self.live = sys.stdout.isatty() if live is None else live
        self.console = Console(highlight=False)
        self.started = time.monotonic()
        self.progress: Progress | None = None
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[summary]}"), TextColumn("eta"), TimeRemainingColumn(),
                console=self.console,
            )
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step,
                                               summary="")
            self.progress.start()

    def update(self, step: int, record: dict[str, Any]) -> None:
        text = summary_text(record, self.depths)
        if self.progress is not None:
            self.progress.update(self.task, completed=step, summary=text)
            return
        done = step - self.start
        elapsed = time.monotonic() - self.started
        eta = elapsed / done * (self.total - step) if done > 0 else 0.0
        print(f"step {step}/{self.total} | {text} | eta {format_duration(eta)}", flush=True)

    def note(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
