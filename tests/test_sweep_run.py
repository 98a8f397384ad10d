"""`mtp sweep` end to end on runs of two steps: a half-finished sweep (one run stopped at step
1, one not started) is continued by the same command, finished runs are not touched again, and
the sweep's files are written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mtp_cli.sweep.grid import make_grid
from mtp_cli.sweep.report import run_dir_of
from tests.cli_helpers import run_mtp

pytestmark = pytest.mark.slow

TINY = Path(__file__).resolve().parents[1] / "specs" / "tiny.yaml"
COMMON = ["data.synthetic.task=sorting", "data.synthetic.documents=300",
          "data.synthetic.val_documents=40", "train.steps=2", "train.eval_interval=1",
          "train.eval_steps=1", "train.micro_batch_size=16", "logging.tensorboard=false",
          "checkpoint.interval=1", "train.warmup_steps=1"]


def _sweep(out: Path):
    args = ["sweep", str(TINY), "--vary", "mtp.num_layers=0,1", "--seeds", "1",
            "--eval-tokens", "512", "--out", str(out)]
    for override in COMMON:
        args += ["--set", override]
    return run_mtp(*args, real_process=True, timeout=900,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_a_half_finished_sweep_is_continued_and_finished_runs_kept(tmp_path):
    out = tmp_path / "sweep"
    grid = make_grid(TINY, ["mtp.num_layers=0,1"], 1, COMMON)
    d0, d1 = (run_dir_of(out, cell, 0) for cell in grid.cells)
    # the D=1 run as a stopped sweep leaves it: trained to step 1 of 2 with its own overrides
    first = run_mtp("train", str(TINY), *grid.run_overrides(grid.cells[1], 0, 1234),
                    "train.steps=1", "--run-dir", str(d1), timeout=600,
                    env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert first.returncode == 0, first.stderr
    (out / "sweep_plan.json").write_text(json.dumps(grid.as_dict()))
    step1 = (d1 / "metrics.jsonl").read_text().splitlines()[0]
    done = _sweep(out)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [json.loads(x) for x in (d1 / "metrics.jsonl").read_text().splitlines()]
    assert (d1 / "metrics.jsonl").read_text().splitlines()[0] == step1  # resumed, not redone
    assert [x["step"] for x in lines if "split" not in x] == [1, 2]
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["complete"] and [c["name"] for c in summary["cells"]] == \
        ["mtp.num_layers=0", "mtp.num_layers=1"]
    assert summary["cells"][1]["acceptance_per_depth"][0]["n"] == 1
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    stamps = {p: p.stat().st_mtime_ns for p in (d0 / "metrics.jsonl", d1 / "probe.json")}
    again = _sweep(out)
    assert again.returncode == 0 and again.stdout.count("already trained") == 2
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
