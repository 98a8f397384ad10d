"""`mtp report`: per-depth loss tables and plots from runs' `metrics.jsonl`.

    from mtp_cli.report import build_report
    report = build_report(["runs/d0", "runs/d1"], out_dir="plots")
    report.as_dict()["comparison"]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtp_cli.errors import UserError
from mtp_cli.report.metrics import RunMetrics, read_metrics
from mtp_cli.report.plots import write_plots
from mtp_cli.report.tables import RunSummary, compare_runs, run_labels


@dataclass
class Report:
    runs: list[RunSummary]
    plots: list[Path] = field(default_factory=list)

    @property
    def warnings(self) -> list[str]:
        return [w for run in self.runs for w in run.metrics.warnings]

    def as_dict(self) -> dict[str, Any]:
        summaries = [run.as_dict() for run in self.runs]
        return {"runs": summaries, "comparison": compare_runs(summaries),
                "plots": [str(p) for p in self.plots], "warnings": self.warnings}


def default_out_dir(run_dirs: list[Path]) -> Path:
    """The single run's directory, or the current directory for several runs."""
    return run_dirs[0] if len(run_dirs) == 1 else Path.cwd()


def build_report(run_dirs: list[str | Path], out_dir: str | Path | None = None, *,
                 plots: bool = True) -> Report:
    """Read every run (UserError for a missing or empty one), summarise, write the plots."""
    if not run_dirs:
        raise UserError("give at least one run directory")
    paths = [Path(p) for p in run_dirs]
    metrics: list[RunMetrics] = [read_metrics(p) for p in paths]
    labels = run_labels(metrics)
    report = Report([RunSummary(label, m) for label, m in zip(labels, metrics, strict=True)])
    if plots:
        target = Path(out_dir) if out_dir is not None else default_out_dir(
            [m.run_dir for m in metrics])
        if target.exists() and not target.is_dir():
            raise UserError(f"--out {target}: exists and is not a directory")
        try:
            report.plots = write_plots(metrics, labels, target)
        except OSError as error:
            raise UserError(f"--out {target}: cannot write the plots ({error.strerror})"
                            ) from None
    return report


__all__ = ["Report", "build_report", "read_metrics"]
