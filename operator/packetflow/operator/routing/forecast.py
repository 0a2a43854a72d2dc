"""Load forecasting: Holt's double exponential smoothing, with an additive seasonal term
(Holt-Winters) when the history shows a period. Pure functions over plain lists.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from packetflow.operator.routing.model import finite

# Smoothing weights: a fast level (the last minute matters most), a slow damped trend (one
# noisy sample must not launch a ramp), a slow seasonal profile (learned over periods).
ALPHA = 0.5
BETA = 0.15
GAMMA = 0.2
DAMPING = 0.9
# A period counts when the autocorrelation at its lag is at least this strong.
SEASONAL_CORRELATION = 0.6
# Surprises are judged over at least this many samples, or not at all.
MIN_SURPRISES = 8


@dataclass(frozen=True)
class Forecast:
    """The fitted model at the newest sample; :meth:`at` projects ``steps`` ahead."""

    level: float
    trend: float
    season: tuple[float, ...]   # additive seasonal offsets by phase; empty: none
    phase: int                  # phase of the next sample
    residual: float             # standard deviation of recent one-step errors
    surprise: float = math.nan  # how far load rose above the forecast within a horizon
                                # (NaN: too few out-of-sample samples to say)

    def at(self, steps: int) -> float:
        """Expected value ``steps`` samples after the newest (>= 0)."""
        damped = sum(DAMPING ** k for k in range(1, steps + 1)) if steps > 0 else 0.0
        value = self.level + damped * self.trend
        if self.season:
            value += self.season[(self.phase + max(steps, 1) - 1) % len(self.season)]
        return max(0.0, value)

    def peak(self, steps: int) -> float:
        """The highest expected value within the next ``steps`` samples (and now)."""
        return max(self.at(k) for k in range(0, max(steps, 0) + 1))


def fill_gaps(values: Sequence[float]) -> list[float]:
    """Carry the last finite value over gaps (leading gaps take the first finite value)."""
    first = next((v for v in values if finite(v)), 0.0)
    out, last = [], first
    for value in values:
        last = value if finite(value) else last
        out.append(last)
    return out


def detect_period(values: Sequence[float], *, shortest: int, longest: int) -> int:
    """The seasonal period (in samples) of ``values``, or 0 when there is none.

    The lag with the strongest autocorrelation of the detrended series between ``shortest``
    and ``longest`` wins, if it is strong and the history holds three full periods (two
    could be a coincidence of two events).
    """
    series = fill_gaps(values)
    n = len(series)
    longest = min(longest, n // 3)
    if longest < shortest or n < 4:
        return 0
    # Detrend with a straight line so a ramp does not look periodic.
    mean_x = (n - 1) / 2
    mean_y = sum(series) / n
    sxx = sum((i - mean_x) ** 2 for i in range(n))
    slope = sum((i - mean_x) * (y - mean_y) for i, y in enumerate(series)) / sxx if sxx else 0.0
    detrended = [y - mean_y - slope * (i - mean_x) for i, y in enumerate(series)]
    variance = sum(d * d for d in detrended)
    if variance <= 1e-12:
        return 0
    # Normalised for the shorter overlap, so long lags are not penalised.
    corr = [1.0] + [sum(detrended[i] * detrended[i - lag] for i in range(lag, n)) / variance
                    * n / (n - lag) for lag in range(1, longest + 2)]
    peaks = [(lag, corr[lag]) for lag in range(max(shortest, 2), longest + 1)
             if corr[lag] >= SEASONAL_CORRELATION and corr[lag] >= corr[lag - 1]
             and corr[lag] >= corr[lag + 1]]
    if not peaks:
        return 0
    strongest = max(value for _, value in peaks)
    # Multiples of the period correlate as well: the shortest peak near the top is the period.
    return next(lag for lag, value in peaks if value >= strongest - 0.1)


def robust_spread(values: Sequence[float]) -> float:
    """A standard deviation that one step change cannot inflate: 1.4826 x the median absolute
    deviation from the median."""
    if not values:
        return 0.0
    ordered = sorted(values)
    middle = ordered[len(ordered) // 2]
    deviations = sorted(abs(v - middle) for v in values)
    return 1.4826 * deviations[len(deviations) // 2]


def fit(values: Sequence[float], period: int = 0, *, horizon: int = 0,
        surprise_quantile: float = 0.99) -> Forecast:
    """Fit Holt (``period`` 0) or additive Holt-Winters to ``values`` (oldest first).

    With ``horizon`` > 0 the fit also measures its own surprises: at every past sample, how
    far the highest value of the next ``horizon`` samples rose above what the model expected
    then (0 when it did not); ``surprise`` is their ``surprise_quantile``, the burst a
    reaction taking ``horizon`` samples must absorb.
    """
    series = fill_gaps(values)
    if not series:
        return Forecast(0.0, 0.0, (), 0, 0.0)
    seasonal = period > 1 and len(series) >= 2 * period
    season = [0.0] * period if seasonal else []
    if seasonal:
        # Initial profile: the first two periods' average offset from their mean.
        base = sum(series[:2 * period]) / (2 * period)
        season = [(series[i] + series[i + period]) / 2 - base for i in range(period)]
    level, trend = series[0] - (season[0] if season else 0.0), 0.0
    errors: list[float] = []
    expected: list[list[float]] = []  # per sample: the model's next ``horizon`` values
    for index, value in enumerate(series[1:], start=1):
        offset = season[index % period] if season else 0.0
        predicted = level + DAMPING * trend + offset
        errors.append(value - predicted)
        previous_level = level
        level = ALPHA * (value - offset) + (1 - ALPHA) * (level + DAMPING * trend)
        trend = BETA * (level - previous_level) + (1 - BETA) * DAMPING * trend
        if season:
            season[index % period] = GAMMA * (value - level) + (1 - GAMMA) * offset
        if horizon:
            expected.append([level + sum(DAMPING ** j for j in range(1, k + 1)) * trend
                             + (season[(index + k) % period] if season else 0.0)
                             for k in range(1, horizon + 1)])
    surprise = math.nan
    # A seasonal profile starts from the first two periods: only later errors are honest.
    first = 2 * period if season else 1
    if horizon and len(series) - horizon - first >= MIN_SURPRISES:
        rises = sorted(max(0.0, max(series[i + 1:i + horizon + 1]) - max(expected[i - 1]))
                       for i in range(first, len(series) - horizon))
        surprise = rises[min(len(rises) - 1, int(surprise_quantile * len(rises)))]
    return Forecast(level, trend, tuple(season), len(series) % period if season else 0,
                    robust_spread(errors[-40:]), surprise)
