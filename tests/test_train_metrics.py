"""metrics.jsonl lines, TensorBoard tag names and the plain progress lines."""

from __future__ import annotations

import json

from mtp_cli import load_spec
from mtp_cli.train.metrics import MetricsWriter, tb_tag
from mtp_cli.train.progress import ProgressReporter, format_duration, summary_text

RECORD = {"step": 3, "tokens": 96, "lm_loss": 2.5, "mtp_1_loss": 2.75, "mtp_2_loss": 3.0,
          "tokens_per_s": 12345.0}


def test_tensorboard_tags_are_megatrons():
    assert [tb_tag(k) for k in ("lm_loss", "lr", "grad_norm", "tokens_per_s", "val_lm_loss",
                                "val_mtp_2_loss")] == [
        "lm loss", "learning-rate", "grad-norm", "tokens-per-second", "val lm loss",
        "val mtp_2 loss"]


def test_metrics_lines_are_flushed_and_stay_json(tmp_path):
    spec = load_spec("specs/tiny.yaml", ["logging.tensorboard=false"])
    writer = MetricsWriter(spec, tmp_path / "metrics.jsonl", tmp_path / "tb", resume_step=0,
                           run_name="t")
    writer.write({"step": 1, "lm_loss": 2.0})
    # flushed per line: readable before close, as by a process watching a live run
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "lm_loss": 2.0}
    writer.write({"step": 2, "lm_loss": float("nan")})
    writer.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[1]) == {"step": 2, "lm_loss": None, "nonfinite": True}
    assert not (tmp_path / "tb").exists()


def test_plain_progress_lines(capsys):
    assert summary_text(RECORD, 2) == "lm 2.5000 | mtp_1 2.7500 | mtp_2 3.0000 | 12.3k tok/s"
    assert format_duration(3725) == "1h02m05s" and format_duration(65) == "1m05s"
    progress = ProgressReporter(total_steps=10, start_step=2, depths=2, live=False)
    progress.update(3, RECORD)
    progress.note("saved checkpoint step_0000004")
    progress.close()
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("step 3/10 | lm 2.5000 | mtp_1 2.7500 | mtp_2 3.0000 | 12.3k tok/s")
    assert out[0].split(" | ")[-1].startswith("eta ")
    assert out[1] == "saved checkpoint step_0000004"


def test_log_interval_averages_every_step_of_the_interval():
    """With log_interval 2, the line carries the mean of both steps' losses (the tracker's
    totals are accumulated, never overwritten) and the latest cumulative acceptance rate."""
    import torch

    from mtp_cli.mtp import MTPLossLoggingHelper
    from mtp_cli.train.metrics import IntervalMetrics

    totals = IntervalMetrics()
    for step, (lm, depth_losses, hits) in enumerate(
            [(3.0, (4.0, 5.0), (1.0, 0.0)), (2.0, (2.0, 3.0), (3.0, 2.0))], start=1):
        for depth, loss in enumerate(depth_losses):
            MTPLossLoggingHelper.save_loss_to_tracker(torch.tensor(loss), depth, 2)
            MTPLossLoggingHelper.save_acceptance_to_tracker(
                torch.tensor(hits[depth]), torch.tensor(4.0), depth, 2)
        metrics = MTPLossLoggingHelper.track_mtp_metrics(step, None, None, totals.mtp_losses)
        totals.add(lm, 0.5, metrics)
    line = totals.averages(2, metrics)
    assert line == {
        "lm_loss": 2.5, "mtp_1_loss": 3.0, "mtp_2_loss": 4.0,
        "mtp_1_acceptance_rate": (25.0 + 75.0) / 2, "mtp_2_acceptance_rate": (0.0 + 50.0) / 2,
        "mtp_1_cumulative_acceptance_rate": 100 * 4 / 8,
        "mtp_2_cumulative_acceptance_rate": 100 * 2 / 8,
    }
    assert totals.steps == 2 and totals.seconds == 1.0


def test_progress_line_shows_the_flop_rate_and_mfu():
    record = {**RECORD, "tflops_per_device": 0.0123, "mfu": 0.0875}
    assert summary_text(record, 0).endswith("12.3k tok/s | 0.0123 TFLOP/s (MFU 8.8%)")
    assert tb_tag("tflops_per_device") == "throughput-tflops-per-device"
