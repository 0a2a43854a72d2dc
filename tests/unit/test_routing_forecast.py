"""The routing controller's pure building blocks: forecasting and the capacity model."""

from __future__ import annotations

import math
import random

from packetflow.operator.routing import capacity, forecast


def test_holt_follows_a_ramp_and_projects_it() -> None:
    ramp = [10.0 + 2.0 * i for i in range(60)]
    fitted = forecast.fit(ramp)
    assert fitted.trend > 1.0
    assert fitted.at(5) > ramp[-1]  # a rising load is expected to keep rising
    assert fitted.peak(5) == max(fitted.at(k) for k in range(6))


def test_seasonal_period_is_found_and_forecast_anticipates_the_peak() -> None:
    period = 40
    rng = random.Random(3)
    values = [100 + 80 * math.sin(2 * math.pi * i / period) + rng.gauss(0, 3)
              for i in range(4 * period)]
    assert forecast.detect_period(values, shortest=5, longest=len(values) // 2) == period
    # At a trough, Holt alone expects the trough to continue; the seasonal fit sees the rise.
    at_trough = values[: 3 * period + 30]
    seasonal = forecast.fit(at_trough, period).at(period // 2)
    plain = forecast.fit(at_trough).at(period // 2)
    assert seasonal > plain + 50


def test_noise_and_ramps_are_not_seasons() -> None:
    rng = random.Random(5)
    assert forecast.detect_period([rng.gauss(100, 10) for _ in range(200)],
                                  shortest=5, longest=100) == 0
    assert forecast.detect_period([float(i) for i in range(200)], shortest=5, longest=100) == 0


def test_surprise_measures_rises_the_forecast_did_not_expect() -> None:
    steady = [100.0] * 60
    stepped = [100.0] * 30 + [300.0] * 30
    assert forecast.fit(steady, horizon=3).surprise == 0.0
    assert forecast.fit(stepped, horizon=3, surprise_quantile=1.0).surprise >= 150
    assert math.isnan(forecast.fit([1.0, 2.0], horizon=3).surprise)  # too little history


def test_robust_spread_ignores_one_step() -> None:
    errors = [1.0, -1.0] * 20 + [200.0]
    assert forecast.robust_spread(errors) < 3


def test_more_load_needs_more_slots_and_a_tighter_objective_more_still() -> None:
    loose = [capacity.slots_needed(rate, 0.1, 1.0, max_slots=10_000) for rate in (10, 50, 200)]
    assert loose == sorted(loose) and loose[0] < loose[-1]
    assert capacity.slots_needed(200, 0.1, 0.01, max_slots=10_000) > \
        capacity.slots_needed(200, 0.1, 1.0, max_slots=10_000)
    # Never busier than the utilisation cap, even with a generous objective.
    assert capacity.slots_needed(200, 0.1, 100.0, max_slots=10_000) >= 200 * 0.1 / 0.92
    assert capacity.slots_needed(0, 0.1, 1.0, max_slots=10) == 0
    assert capacity.slots_needed(1e6, 0.1, 1.0, max_slots=10) == 10  # capped


def test_sustainable_rate_inverts_the_model() -> None:
    rate = capacity.sustainable_rate(4, 0.1, 0.5, slots_per_replica=8)
    assert 0 < rate < 4 * 8 / 0.1
    assert capacity.replicas_needed(rate, 0.1, 0.5, slots_per_replica=8, max_replicas=100) <= 4
    assert capacity.replicas_needed(rate * 1.2, 0.1, 0.5, slots_per_replica=8,
                                    max_replicas=100) > 4
    # With a tight objective, bigger pools carry more per replica (economy of scale)...
    assert capacity.sustainable_rate(10, 0.1, 0.02, slots_per_replica=8) / 10 > \
        capacity.sustainable_rate(4, 0.1, 0.02, slots_per_replica=8) / 4
    # ...and with a loose one the utilisation cap is what limits a replica.
    assert math.isclose(rate / 4, 8 / 0.1 * capacity.MAX_UTILISATION, rel_tol=0.01)
