"""The sweep's statistics against values worked by hand and published tables: the incomplete
beta function, Student's t CDF and quantiles, Welch's test and its 95% interval; and the
equal-time reading of a run's log."""

from __future__ import annotations

import math

import pytest

from mtp_cli.sweep.stats import betainc, mean_std, t_cdf, t_quantile, welch
from mtp_cli.sweep.timeline import elapsed_by_step, loss_at_time, val_curve


def test_incomplete_beta_by_the_binomial_sum():
    # I_x(a, b) for integers = P(Binomial(a+b-1, x) >= a): I_0.4(2, 3) = 6(.16)(.36) + 4(.064)(.6)
    # + .0256
    assert betainc(2, 3, 0.4) == pytest.approx(0.5248, abs=1e-12)
    assert betainc(1, 1, 0.3) == pytest.approx(0.3, abs=1e-12)  # uniform
    assert betainc(0.5, 0.5, 0.5) == pytest.approx(0.5, abs=1e-12)  # symmetric
    assert betainc(3, 2, 0.0) == 0.0 and betainc(3, 2, 1.0) == 1.0


def test_t_distribution_closed_forms_and_tables():
    assert t_cdf(1.0, 1) == pytest.approx(0.75, abs=1e-12)  # Cauchy: 1/2 + atan(1)/pi
    assert t_cdf(2.0, 2) == pytest.approx(0.5 + 1 / math.sqrt(6), abs=1e-12)  # 1/2 + t/2sqrt(2+t²)
    assert t_cdf(-2.0, 2) == pytest.approx(0.5 - 1 / math.sqrt(6), abs=1e-12)
    # two-sided 95% critical values, as printed in every t table
    for df, critical in ((1, 12.706), (2, 4.303), (5, 2.571), (10, 2.228), (30, 2.042)):
        assert t_quantile(0.975, df) == pytest.approx(critical, abs=5e-4)


def test_mean_and_sample_std():
    assert mean_std([1.0, 2.0, 3.0, 4.0]) == (2.5, pytest.approx(math.sqrt(5 / 3), abs=1e-12))
    assert mean_std([2.0]) == (2.0, None) and mean_std([]) == (None, None)


def test_welch_on_fixed_numbers_worked_by_hand():
    """a = 1,2,3 (mean 2, s² 1), b = 4,5,6,7 (mean 5.5, s² 5/3): se² = 1/3 + 5/12 = 3/4,
    t = -3.5 / sqrt(.75) = -4.04145, df = .5625 / ((1/3)²/2 + (5/12)²/3) = 4.95918; p and the
    interval's critical value t(0.975, 4.959) = 2.57696 as scipy.stats gives them."""
    result = welch([1, 2, 3], [4, 5, 6, 7])
    assert result.difference == -3.5
    assert result.t == pytest.approx(-3.5 / math.sqrt(0.75), abs=1e-12)
    assert result.df == pytest.approx(0.5625 / ((1 / 3) ** 2 / 2 + (5 / 12) ** 2 / 3), abs=1e-12)
    assert result.p == pytest.approx(0.01007694334798886, abs=1e-9)
    half = 2.576958449009055 * math.sqrt(0.75)
    assert (result.ci_low, result.ci_high) == (pytest.approx(-3.5 - half, abs=1e-8),
                                               pytest.approx(-3.5 + half, abs=1e-8))


def test_welch_equal_samples_and_single_seeds():
    same = welch([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert same.difference == 0 and same.p == pytest.approx(1.0) and same.t == 0
    single = welch([1.0], [2.0, 3.0])
    assert single.difference == -1.5 and single.p is None and single.ci_low is None


def _line(step: int, time: float, tokens_per_s: float = 100.0) -> dict:
    return {"step": step, "tokens": step * 100, "time": time, "tokens_per_s": tokens_per_s}


def test_elapsed_time_from_the_log_and_a_resume_gap():
    # 1 s a step; the first line counts its step at the first interval's pace; a resume after
    # step 3 leaves a 500 s gap that the line's own rate (100 tok / 100 tok/s = 1 s) replaces
    train = [_line(1, 1000.0), _line(2, 1001.0), _line(3, 1002.0), _line(4, 1502.0),
             _line(5, 1503.0)]
    assert elapsed_by_step(train) == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0)]


def test_equal_time_interpolation_on_a_synthetic_log():
    # 2 s a step, validation at steps 2 and 4 and 6 (losses 3, 2, 1.5)
    train = [_line(s, 100.0 + 2 * s, 50.0) for s in range(1, 7)]
    val = [{"step": s, "split": "val", "val_lm_loss": v} for s, v in ((2, 3.0), (4, 2.0),
                                                                       (6, 1.5))]
    curve = val_curve(train, val)
    assert curve == [(4.0, 3.0), (8.0, 2.0), (12.0, 1.5)]
    assert loss_at_time(curve, 6.0) == pytest.approx(2.5)  # halfway between steps 2 and 4
    assert loss_at_time(curve, 11.0) == pytest.approx(1.625)
    assert loss_at_time(curve, 13.0) is None and loss_at_time(curve, 3.0) is None
