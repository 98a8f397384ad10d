"""How `mtp report` presents numbers: acceptance rates apart from losses and in %, smoothed
curves labelled as smoothed, axes with units, plot files readable like any other file."""

from __future__ import annotations

import os
import stat

from mtp_cli.report.metrics import read_metrics
from mtp_cli.report.plots import acceptance_figure, loss_figure
from tests.inspect_fixtures import invoke
from tests.report_helpers import write_run


def test_acceptance_rates_get_their_own_table_in_percent(tmp_path):
    train = write_run(tmp_path / "d2", depths=2)
    result = invoke("report", tmp_path / "d2", "--out", tmp_path / "plots")
    assert result.exit_code == 0, result.output
    text = result.stdout
    losses, acceptance = text.split("MTP acceptance rate (%)")
    assert "losses (nats/token)" in losses
    assert "acceptance" not in losses.split("losses (nats/token)")[1]
    last = train[-1]["mtp_2_acceptance_rate"]
    assert f"{last:.2f} %" in acceptance
    assert "mtp_2 acceptance rate" in acceptance and "mtp_1 cumulative acceptance" in acceptance
    assert "lm loss" not in acceptance


def test_plots_label_smoothing_and_units(tmp_path):
    write_run(tmp_path / "run", depths=1)  # 50 points: smoothed
    runs = [read_metrics(tmp_path / "run")]
    figure = loss_figure(runs, ["run"], "tokens")
    axes = figure.axes[0]
    assert axes.get_ylabel() == "loss (nats/token)" and axes.get_xlabel() == "tokens seen"
    legend = [t.get_text() for t in axes.get_legend().get_texts()]
    assert "run (smoothed)" in legend
    caption = "(smoothed): moving average of 2 logged points; faint lines: raw values"
    assert caption in figure.get_suptitle()
    steps = loss_figure(runs, ["run"], "step").axes[0]
    assert steps.get_xlabel() == "step"
    accept = acceptance_figure(runs, ["run"]).axes[0]
    assert accept.get_ylabel() == "acceptance rate (%)"


def test_short_series_are_not_called_smoothed(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(
        f'{{"step": {s}, "tokens": {s * 10}, "lm_loss": {3 - s / 10}}}\n' for s in range(1, 6)))
    figure = loss_figure([read_metrics(run)], ["run"], "step")
    assert [t.get_text() for t in figure.axes[0].get_legend().get_texts()] == ["run"]
    assert "smoothed" not in figure.get_suptitle()


def test_png_files_get_the_usual_mode(tmp_path):
    write_run(tmp_path / "run", depths=1)
    previous = os.umask(0o022)
    try:
        result = invoke("report", tmp_path / "run", "--out", tmp_path / "plots")
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    pngs = sorted((tmp_path / "plots").iterdir())
    assert [p.name for p in pngs] == ["report_acceptance_vs_steps.png",
                                      "report_loss_vs_steps.png", "report_loss_vs_tokens.png"]
    assert {stat.S_IMODE(p.stat().st_mode) for p in pngs} == {0o644}


def _short_run(run, steps: int):
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(
        f'{{"step": {s}, "tokens": {s * 10}, "lm_loss": {3 - s / 100}}}\n'
        for s in range(1, steps + 1)))
    return read_metrics(run)


def test_a_short_run_beside_a_long_one_is_smoothed_the_same_way(tmp_path):
    """Two identical runs, one cut at step 20, must draw identically over steps 1..20: both
    smoothed with the long run's window (300 points -> 12), never one raw, one averaged."""
    long, short = _short_run(tmp_path / "long", 300), _short_run(tmp_path / "short", 20)
    figure = loss_figure([long, short], ["long", "short"], "step")
    lines = figure.axes[0].get_lines()
    smoothed = [line for line in lines if line.get_label().endswith("(smoothed)")]
    assert [line.get_label() for line in smoothed] == ["long (smoothed)", "short (smoothed)"]
    long_y, short_y = smoothed[0].get_ydata(), smoothed[1].get_ydata()
    assert list(short_y) == list(long_y[:20])
    values = [3 - s / 100 for s in range(1, 13)]
    assert abs(long_y[11] - sum(values) / 12) < 1e-12  # a 12-point window, by hand


def test_step_axes_tick_at_integers(tmp_path):
    a, b = _short_run(tmp_path / "a", 3), _short_run(tmp_path / "b", 3)
    figure = loss_figure([a, b], ["a", "b"], "step")
    figure.canvas.draw()
    delta = figure.axes[-1]
    assert delta.get_title().startswith("lm loss minus a")
    ticks = [t for t in delta.get_xticks() if delta.get_xlim()[0] <= t <= delta.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
