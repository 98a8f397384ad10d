"""Seed statistics for `mtp sweep`: mean and sample standard deviation, Welch's t-test and the
95% confidence interval of a difference of means, with Student's t distribution computed here
(no scipy): its CDF through the regularized incomplete beta function (Lentz's continued
fraction, as in Numerical Recipes' `betacf`), its quantile by bisection of the CDF.

Two-sided p of Welch's test: t = (mean_a - mean_b) / se, se = sqrt(s_a^2/n_a + s_b^2/n_b),
df by Welch-Satterthwaite, p = I_{df/(df+t^2)}(df/2, 1/2). With fewer than 2 values on a side
there is no variance: the interval and p are None.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

_EPS = 1e-15
_TINY = 1e-300


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """(mean, sample standard deviation with n - 1); std None below 2 values."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b), modified Lentz (converges for x < (a+1)/(a+b+2))."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for numerator in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                          -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + numerator / c
            c = c if abs(c) > _TINY else _TINY
            h *= d * c
        if abs(d * c - 1.0) < _EPS:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (bisection on t_cdf, to 1e-12)."""
    low, high = -1e3, 1e3
    for _ in range(200):
        middle = (low + high) / 2
        if t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
        if high - low < 1e-12:
            break
    return (low + high) / 2


@dataclass
class Comparison:
    """`a` minus `b`: the difference of means, its 95% interval, Welch's t, df and p."""

    difference: float
    ci_low: float | None
    ci_high: float | None
    t: float | None
    df: float | None
    p: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def welch(a: list[float], b: list[float], level: float = 0.95) -> Comparison:
    """Welch's unequal-variance t-test of mean(a) - mean(b) (module doc)."""
    mean_a, std_a = mean_std(a)
    mean_b, std_b = mean_std(b)
    if mean_a is None or mean_b is None:
        raise ValueError("welch needs at least one value on each side")
    difference = mean_a - mean_b
    if std_a is None or std_b is None:
        return Comparison(difference, None, None, None, None, None)
    va, vb = std_a ** 2 / len(a), std_b ** 2 / len(b)
    se = math.sqrt(va + vb)
    if se == 0.0:
        return Comparison(difference, difference, difference, None, None,
                          1.0 if difference == 0 else 0.0)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    t = difference / se
    p = betainc(df / 2.0, 0.5, df / (df + t * t))
    half = t_quantile(0.5 + level / 2, df) * se
    return Comparison(difference, difference - half, difference + half, t, df, p)
