"""Where training metrics go: metrics.jsonl, TensorBoard (Megatron's tags) and W&B.

Only global rank 0 writes. `metrics.jsonl` is appended one JSON object per line and flushed per
line, so a run killed at any moment leaves every earlier line whole; on resume the lines after
the checkpoint are dropped first (`run_dir.truncate_metrics`) and TensorBoard purges the same
steps (`purge_step`), so a resumed run's history reads as one run.
"""

from __future__ import annotations

import json
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mtp_cli.config.schema import RunSpec
from mtp_cli.train.nonfinite import finite_json

# metrics.jsonl key -> TensorBoard tag (Megatron's names). The MTP training tags are written
# by MTPLossLoggingHelper.track_mtp_metrics itself.
TB_TAGS = {
    "lm_loss": "lm loss",
    "lr": "learning-rate",
    "grad_norm": "grad-norm",
    "tokens_per_s": "tokens-per-second",
    "tflops_per_device": "throughput-tflops-per-device",
    "mfu": "mfu",
    "val_lm_loss": "val lm loss",
}


def tb_tag(key: str) -> str:
    """TensorBoard tag of a metrics.jsonl key: `val_mtp_2_loss` -> `val mtp_2 loss`."""
    if key in TB_TAGS:
        return TB_TAGS[key]
    if key.startswith("val_mtp_") and key.endswith("_loss"):
        return f"val {key[len('val_'):-len('_loss')]} loss"
    return key


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage / 2**20 if sys.platform == "darwin" else usage / 2**10  # bytes vs KiB


@dataclass
class IntervalMetrics:
    """Sums over the steps since the last metrics line, averaged when the line is written.

    `mtp_losses` is the `total_loss_dict` that `MTPLossLoggingHelper.track_mtp_metrics`
    accumulates into (`mtp_{k} loss`, summed over the interval's steps, never overwritten).
    """

    steps: int = 0  # finite steps (their losses are averaged)
    skipped: int = 0  # non-finite steps skipped (`train.nonfinite: skip_step`)
    seconds: float = 0.0
    lm_loss: float = 0.0
    mtp_losses: dict[str, float] = field(default_factory=dict)
    acceptance: dict[str, float] = field(default_factory=dict)
    distill: dict[str, float] = field(default_factory=dict)  # `mtp_{k}_distill` (mtp.distill)
    moe: dict[str, float] = field(default_factory=dict)  # MoE metrics (train/moe_metrics.py)

    def add_moe(self, values: dict[str, float]) -> None:
        """One finite step's MoE metrics (aux losses, load imbalance), averaged per line."""
        for name, value in values.items():
            self.moe[name] = self.moe.get(name, 0.0) + value

    def add(self, lm_loss: float, seconds: float, mtp_metrics: dict[str, float]) -> None:
        """One step (after track_mtp_metrics filled `mtp_losses` for it)."""
        self.steps += 1
        self.seconds += seconds
        self.lm_loss += lm_loss
        for name, value in mtp_metrics.items():
            if name.endswith("_acceptance_rate") and "cumulative" not in name:
                self.acceptance[name] = self.acceptance.get(name, 0.0) + value
            elif name.endswith("_distill"):
                self.distill[name] = self.distill.get(name, 0.0) + value

    def averages(self, depths: int, mtp_metrics: dict[str, float]) -> dict[str, float]:
        """lm and per-depth losses and acceptance rates averaged over the interval; the
        cumulative acceptance rate as of the last step."""
        n = max(self.steps, 1)
        out = {"lm_loss": self.lm_loss / n}
        for k in range(1, depths + 1):
            out[f"mtp_{k}_loss"] = self.mtp_losses.get(f"mtp_{k} loss", 0.0) / n
            out[f"mtp_{k}_acceptance_rate"] = self.acceptance.get(
                f"mtp_{k}_acceptance_rate", 0.0) / n
            out[f"mtp_{k}_cumulative_acceptance_rate"] = mtp_metrics.get(
                f"mtp_{k}_cumulative_acceptance_rate", 0.0)
        out.update({name: value / n for name, value in self.distill.items()})
        out.update({name: value / n for name, value in self.moe.items()})
        return out


class MetricsWriter:
    """metrics.jsonl + TensorBoard + W&B for global rank 0."""

    def __init__(self, spec: RunSpec, metrics_path: Path, tb_dir: Path, *, resume_step: int,
                 run_name: str, warn=print) -> None:
        self.file = open(metrics_path, "a", encoding="utf-8")  # noqa: SIM115
        self.tb = None
        if spec.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(tb_dir), purge_step=resume_step + 1)
        self.wandb = _init_wandb(spec, run_name, metrics_path.parent, warn)

    def write(self, record: dict[str, Any]) -> None:
        """Append one line to metrics.jsonl and flush it. JSON has no NaN/inf: a non-finite
        value is written as null and the line gets `"nonfinite": true`."""
        record, nonfinite = finite_json(record)
        if nonfinite:
            record["nonfinite"] = True
        line = json.dumps(record)
        self.file.write(line + "\n")
        self.file.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """TensorBoard and W&B scalars (metrics.jsonl keys, translated to Megatron's tags)."""
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(tb_tag(key), value, step)
        if self.wandb is not None:
            self.wandb.log({tb_tag(k): v for k, v in values.items()}, step=step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _init_wandb(spec: RunSpec, run_name: str, run_dir: Path, warn) -> Any:
    """The `wandb` module after `wandb.init`, when installed and a project is set; else None."""
    project = spec.logging.wandb_project
    if not project:
        return None
    try:
        import wandb
    except ImportError:
        warn(f"logging.wandb_project is {project!r} but wandb is not installed: "
             "logging to metrics.jsonl and TensorBoard only")
        return None
    wandb.init(project=project, name=run_name, dir=str(run_dir), resume="allow",
               config=spec.model_dump(mode="json"))
    return wandb
