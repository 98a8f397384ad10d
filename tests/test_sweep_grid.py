"""`mtp sweep`'s grid and report without training: the cells of several --vary flags, bad
flags exit 2 naming the key with nothing created, and a sweep directory of hand-written runs
summarised (means, Welch against the baseline, equal time) with its PNG and `mtp report`."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from mtp_cli.errors import UserError
from mtp_cli.sweep.grid import check_grid, make_grid
from mtp_cli.sweep.report import PLAN_FILE, run_dir_of, summarize
from mtp_cli.sweep.runner import write_report
from mtp_cli.sweep.stats import welch
from tests.inspect_fixtures import invoke

TINY = Path(__file__).resolve().parents[1] / "specs" / "tiny.yaml"


def test_cells_are_the_product_first_flag_slowest_and_seeds_shift_train_seed():
    grid = make_grid(TINY, ["mtp.num_layers=0,1,2", "mtp.loss_scaling_factor=0.1,0.3"], 2, [])
    names = [cell.name for cell in grid.cells]
    assert names[:3] == ["mtp.num_layers=0,mtp.loss_scaling_factor=0.1",
                         "mtp.num_layers=0,mtp.loss_scaling_factor=0.3",
                         "mtp.num_layers=1,mtp.loss_scaling_factor=0.1"]
    assert len(names) == 6 and len({c.slug for c in grid.cells}) == 6
    specs = check_grid(grid)
    assert [specs[c].mtp.num_layers for c in grid.cells] == [0, 0, 1, 1, 2, 2]
    assert grid.run_overrides(grid.cells[2], 1, 1234)[-1] == "train.seed=1235"


@pytest.mark.parametrize(("vary", "named"), [
    ("mtp.num_layrs=0,1", "--vary mtp.num_layrs"),
    ("mtp.num_layers=0,-1", "--vary mtp.num_layers"),
    ("train.lr=fast", "--vary train.lr"),
    ("mtp.num_layers", "--vary"),
])
def test_bad_vary_exits_2_naming_the_key_and_runs_nothing(tmp_path, vary, named):
    out = tmp_path / "sweep"
    result = invoke("sweep", TINY, "--vary", "mtp.num_layers=0,1", "--vary", vary,
                    "--out", out) if not vary.startswith("mtp.num_layers=") else \
        invoke("sweep", TINY, "--vary", vary, "--out", out)
    assert result.exit_code == 2, result.output
    assert named in result.stderr and "Traceback" not in result.output
    assert not out.exists()


def _fake_run(run_dir: Path, losses: list[float], seconds_per_step: float, final: float,
              accept: float | None) -> None:
    """A run of 4 steps (100 tokens each) validated at steps 2 and 4, an eval and a probe."""
    run_dir.mkdir(parents=True)
    lines = []
    for step in range(1, 5):
        lines.append({"step": step, "tokens": 100 * step, "lm_loss": 3.0, "time":
                      1000.0 + seconds_per_step * step, "tokens_per_s": 100 / seconds_per_step})
        if step % 2 == 0:
            lines.append({"step": step, "tokens": 100 * step, "split": "val",
                          "val_lm_loss": losses[step // 2 - 1]})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (run_dir / "eval").mkdir()
    depths = [] if accept is None else [{"depth": 1, "speculative_acceptance_rate": accept}]
    (run_dir / "eval" / "step_0000004.json").write_text(json.dumps(
        {"step": 4, "lm_loss": final, "depths": depths}))
    probe = {"speedup": None, "speculative": None} if accept is None else \
        {"speedup": 1.2, "speculative": {"mean_accepted_length": 1 + accept}}
    (run_dir / "probe.json").write_text(json.dumps(probe))


def test_summary_of_a_sweep_directory_and_its_png(tmp_path):
    grid = make_grid(TINY, ["mtp.num_layers=0,1"], 3, [])
    out = tmp_path / "sweep"
    out.mkdir()
    (out / PLAN_FILE).write_text(json.dumps(grid.as_dict()))
    base_final, mtp_final = [2.0, 2.1, 2.2], [1.9, 1.95, 2.1]
    for seed in range(3):
        # D=0: 1 s a step, D=1: 2 s a step: the equal-time point is the shortest run's end,
        # D=0's 4 s; validation at step 2, then the final loss at step 4
        _fake_run(run_dir_of(out, grid.cells[0], seed), [3.0, base_final[seed]], 1.0,
                  base_final[seed], None)
        _fake_run(run_dir_of(out, grid.cells[1], seed), [2.8, mtp_final[seed]], 2.0,
                  mtp_final[seed], 0.5 + 0.1 * seed)
    summary = summarize(out)
    assert summary["equal_time_seconds"] == pytest.approx(4.0)
    base, mtp = summary["cells"]
    assert base["loss_equal_tokens"]["mean"] == pytest.approx(2.1)
    assert base["loss_equal_tokens"]["std"] == pytest.approx(statistics.stdev(base_final))
    # D=1 at 4 s is its step 2: the first validation point, 2.8
    assert mtp["loss_equal_time"]["values"] == pytest.approx([2.8, 2.8, 2.8])
    expected = welch(mtp_final, base_final)
    assert mtp["vs_baseline"]["equal_tokens"]["p"] == pytest.approx(expected.p)
    assert mtp["vs_baseline"]["equal_tokens"]["difference"] == pytest.approx(
        statistics.mean(mtp_final) - 2.1)
    assert mtp["acceptance_per_depth"][0]["mean"] == pytest.approx(0.6)
    assert mtp["tokens_per_round"]["mean"] == pytest.approx(1.6) and summary["complete"]
    written = write_report(out)["written"]
    png = Path(written[1])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert json.loads((out / "sweep.json").read_text())["baseline"] == "mtp.num_layers=0"
    result = invoke("report", out)
    assert result.exit_code == 0, result.output
    assert "Δ to the" in result.stdout and "p=" in result.stdout  # (an 80-column table)


def test_a_directory_holding_another_sweep_is_refused(tmp_path):
    from mtp_cli.sweep.runner import _claim

    out = tmp_path / "sweep"
    _claim(out, make_grid(TINY, ["mtp.num_layers=0,1"], 2, []))
    _claim(out, make_grid(TINY, ["mtp.num_layers=0,1"], 2, []))  # the same: continues
    with pytest.raises(UserError, match="holds another sweep"):
        _claim(out, make_grid(TINY, ["mtp.num_layers=0,2"], 2, []))
