"""`mtp sweep`: train every cell x seed of a grid, evaluate each final checkpoint, summarize.

Order: seed by seed, every cell within a seed (cells interleaved, so machine load drifting
over the sweep falls on every cell alike). Each run is a normal run directory
DIR/<cell>/seed<s>, trained by `python -m mtp_cli train` in its own process (the code path of
`mtp train`; an unfinished run directory resumes, so rerunning the sweep continues it). A run
whose `latest` checkpoint is at the spec's `train.steps` is not trained again; its
evaluation (`mtp eval`'s `evaluate`, RUN/eval/step_N.json) and decoding probe (RUN/probe.json)
are reused when present.

The decoding probe: greedy decoding of held-out prompts (the first PROBE_PROMPTS validation
windows, their first PROBE_PROMPT_TOKENS tokens), PROBE_NEW_TOKENS new tokens each, plainly and
speculatively with every depth, timed interleaved PROBE_REPEATS times (plain, speculative,
plain, ...; the best of each), so a load change hits both; the speed-up is their ratio.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mtp_cli.checkpoint.layout import checkpoint_step, checkpoints_of
from mtp_cli.checkpoint.run_dir import read_latest
from mtp_cli.errors import Problem, UserError
from mtp_cli.sweep.grid import Grid, check_grid
from mtp_cli.sweep.report import (
    PLAN_FILE,
    PLOT_FILE,
    PROBE_FILE,
    read_plan,
    run_dir_of,
    summarize,
    write_summary,
)

PROBE_PROMPTS = 8
PROBE_PROMPT_TOKENS = 24
PROBE_NEW_TOKENS = 32
PROBE_REPEATS = 2
BUDGETS = ("tokens", "seconds")

Say = Callable[[str], None]


def finished_step(run_dir: Path) -> int | None:
    """The step of the run's `latest` checkpoint (None: no complete checkpoint)."""
    checkpoints = checkpoints_of(run_dir)
    if not checkpoints.is_dir():
        return None
    name, _ = read_latest(checkpoints)
    return checkpoint_step(name) if name is not None else None


def _claim(out: Path, grid: Grid) -> None:
    """DIR/sweep_plan.json: written once; a rerun must ask for the same grid."""
    existing = read_plan(out)
    if existing is not None and existing.as_dict() != grid.as_dict():
        raise UserError(problems=[Problem(
            "holds another sweep (its spec, --vary, --seeds or --set differ); give another "
            "--out, or the same arguments to continue it", file=str(out / PLAN_FILE))])
    if existing is None:
        from mtp_cli.checkpoint.publish import atomic_write_text

        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / PLAN_FILE, json.dumps(grid.as_dict(), indent=1) + "\n")


def train_run(grid: Grid, overrides: list[str], run_dir: Path, nproc: int) -> None:
    command = [sys.executable, "-m", "mtp_cli", "train", str(grid.spec_path), *overrides,
               "--run-dir", str(run_dir), "--nproc", str(nproc)]
    done = subprocess.run(command, env=os.environ.copy(), check=False)
    if done.returncode != 0:
        raise UserError(f"mtp sweep: training {run_dir} failed (exit {done.returncode}); "
                        f"rerun the same mtp sweep command to continue")


def probe(run_dir: Path) -> dict[str, Any]:
    """The decoding probe of the module doc, as a JSON-ready dict."""
    from mtp_cli.data.datasets import build_datasets
    from mtp_cli.generate.load import load_for_generation
    from mtp_cli.generate.run import GenerateOptions, decode_ids

    loaded = load_for_generation(run_dir)
    _, val = build_datasets(loaded.spec)
    count = min(PROBE_PROMPTS, len(val))
    prompts = [w[:PROBE_PROMPT_TOKENS].long() for w in val.windows(list(range(count)))]
    options = GenerateOptions(max_new_tokens=PROBE_NEW_TOKENS, speculative="on",
                              baseline=False)
    depths = loaded.mtp_depths
    plain, spec, stats, identical = [], [], None, None
    for _ in range(PROBE_REPEATS):
        plain_ids, seconds, _ = decode_ids(loaded, prompts, options, 0)
        plain.append(seconds)
        if depths:
            ids, seconds, stats = decode_ids(loaded, prompts, options, depths)
            spec.append(seconds)
            identical = ids == plain_ids
    tokens = sum(len(ids) for ids in plain_ids)
    return {"prompts": count, "new_tokens": tokens, "plain_seconds": min(plain),
            "speculative_seconds": min(spec) if spec else None,
            "speedup": min(plain) / min(spec) if spec else None,
            "speculative": stats.as_dict() if stats is not None else None,
            "identical_to_plain": identical}


def _finish_run(run_dir: Path, steps: int, eval_tokens: int, say: Say) -> None:
    from mtp_cli.checkpoint.publish import atomic_write_text
    from mtp_cli.generate.eval import eval_path, evaluate
    from mtp_cli.generate.load import load_for_generation

    if not eval_path(run_dir, steps).is_file():
        say(f"  eval {run_dir} ({eval_tokens:,} held-out tokens)")
        evaluate(load_for_generation(run_dir), tokens=eval_tokens)
    if not (run_dir / PROBE_FILE).is_file():
        say(f"  decoding probe {run_dir}")
        atomic_write_text(run_dir / PROBE_FILE, json.dumps(probe(run_dir), indent=1) + "\n")


def run_sweep(grid: Grid, out: Path, *, nproc: int = 1, budget: str = "tokens",
              eval_tokens: int = 16384, say: Say = print) -> dict[str, Any]:
    """Run (or continue) the sweep of `grid` under `out`; returns the summary it wrote."""
    if budget not in BUDGETS:
        raise UserError(problems=[Problem(f"{budget!r} is not tokens or seconds",
                                          key="--budget")])
    if eval_tokens < 1:
        raise UserError(problems=[Problem("must be at least 1", key="--eval-tokens")])
    specs = check_grid(grid)  # every cell before any run
    out = Path(out)
    _claim(out, grid)
    cells = grid.cells
    for seed in range(grid.seeds):
        for number, cell in enumerate(cells, start=1):
            spec = specs[cell]
            run_dir = run_dir_of(out, cell, seed)
            steps = spec.train.steps
            label = f"[seed {seed + 1}/{grid.seeds}, cell {number}/{len(cells)}] {cell.name}"
            if finished_step(run_dir) != steps:
                say(f"{label}: training {run_dir}")
                train_run(grid, grid.run_overrides(cell, seed, spec.train.seed), run_dir, nproc)
            else:
                say(f"{label}: already trained ({steps} steps)")
            _finish_run(run_dir, steps, eval_tokens, say)
    return write_report(out, grid, budget)


def write_report(out: Path, grid: Grid | None = None, budget: str = "tokens"
                 ) -> dict[str, Any]:
    """summarize + DIR/sweep.json + DIR/sweep.png; returns the summary."""
    from mtp_cli.sweep.plot import write_sweep_png

    summary = summarize(out, grid, budget)
    summary["written"] = [str(write_summary(out, summary)),
                          str(write_sweep_png(summary, Path(out) / PLOT_FILE))]
    return summary
