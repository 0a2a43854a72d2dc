"""Pure parts of the gateway, as plain code with an injected clock: the peak-EWMA balancer,
outlier ejection, retry and hedge budgets, the hedge delay, the canary split, retry rules."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from typing import Any

import pytest

from packetflow.gateway.balancer import PENDING_PENALTY, PeakEwma, pick_two
from packetflow.gateway.budget import ShareBudget
from packetflow.gateway.hedging import LatencyWindow, hedge_delay
from packetflow.gateway.outlier import (
    OutlierPolicy,
    OutlierState,
    consecutive_ejection_due,
    eject,
    may_eject,
    sweep,
)
from packetflow.gateway.policy import (
    RESOURCE_EXHAUSTED,
    UNAVAILABLE,
    choose_canary,
    may_retry,
    session_bucket,
)
from packetflow.spec import OutlierDetection


def outliers(**overrides: Any) -> OutlierPolicy:
    """The manifest's default outlier policy with some settings changed."""
    return dataclasses.replace(OutlierPolicy.from_spec(OutlierDetection()), **overrides)


class Clock:
    """A clock tests move by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------------------- balancer


def test_peak_ewma_jumps_to_a_slow_sample_and_decays_back() -> None:
    load = PeakEwma(now=0.0, decay=10.0)
    load.started()
    load.finished(0.010, now=0.0)
    assert load.cost(0.0) == pytest.approx(0.010)
    load.started()
    load.finished(0.200, now=0.1)  # one slow answer counts in full at once (peak)
    assert load.cost(0.1) == pytest.approx(0.200)
    for step in range(1, 400):  # fast answers pull it back down over the decay time
        load.started()
        load.finished(0.010, now=0.1 + step * 0.1)
    assert load.cost(40.0) < 0.015


def test_peak_ewma_cost_grows_with_calls_in_flight_and_penalises_the_unmeasured() -> None:
    load = PeakEwma(now=0.0)
    assert load.cost(0.0) == 0.0  # a fresh endpoint is tried first...
    load.started()
    assert load.cost(0.0) == PENDING_PENALTY + 1  # ...but not again before it answered
    load.finished(0.004, now=0.0)
    load.started()
    load.started()
    assert load.cost(0.0) == pytest.approx(0.004 * 3)
    load.finished(0.001, now=0.0, abandoned=True)  # a lost hedge: at least 1 ms, no news
    assert load.pending == 1 and load.cost(0.0) == pytest.approx(0.004 * 2)
    load.started()
    load.finished(0.050, now=0.0, abandoned=True)  # abandoned after 50 ms: that slow at least
    assert load.cost(0.0) == pytest.approx(0.050 * 2)


def test_pick_two_prefers_the_cheaper_endpoint_and_spreads_over_equals() -> None:
    rng = random.Random(7)
    costs = {"fast": 1.0, "slow": 5.0, "mid": 2.0}
    picks = Counter(pick_two(list(costs), costs.__getitem__, rng) for _ in range(3000))
    # "slow" can only win a draw against itself, which two distinct choices never make.
    assert picks["slow"] == 0
    assert picks["fast"] > picks["mid"] > 0
    equal = Counter(pick_two(["a", "b"], lambda _: 1.0, rng) for _ in range(2000))
    assert min(equal.values()) > 800
    assert pick_two([], lambda _: 0.0, rng) is None
    assert pick_two(["only"], lambda _: 0.0, rng) == "only"


# ---------------------------------------------------------------------------- outliers


def test_consecutive_failures_eject_for_growing_times_capped() -> None:
    policy = outliers(consecutive_failures=3, base_ejection=10.0, max_ejection=25.0)
    state = OutlierState()
    for _ in range(2):
        state.record(success=False, gateway_failure=True)
    assert not consecutive_ejection_due(state, policy)
    state.record(success=True, gateway_failure=False)  # a success breaks the run
    for _ in range(3):
        state.record(success=False, gateway_failure=True)
    assert consecutive_ejection_due(state, policy)
    assert eject(state, now=0.0, policy=policy) == 10.0
    assert state.ejected and state.consecutive == 0
    sweep([state], now=10.0, policy=policy)  # over: back in service, repeats remembered
    assert not state.ejected
    assert eject(state, now=10.0, policy=policy) == 20.0
    sweep([state], now=30.0, policy=policy)
    assert eject(state, now=30.0, policy=policy) == 25.0  # capped at max_ejection


def test_time_in_service_forgives_one_repeat_per_interval() -> None:
    policy = outliers(base_ejection=10.0)
    state = OutlierState()
    eject(state, 0.0, policy)
    sweep([state], now=10.0, policy=policy)  # returns; still one repeat on record
    sweep([state], now=20.0, policy=policy)  # a whole interval in service: forgiven
    assert eject(state, 20.0, policy) == 10.0


def test_ejected_share_is_capped_but_one_may_always_go() -> None:
    policy = outliers(max_ejection_percent=50)
    pool = [OutlierState() for _ in range(4)]
    assert may_eject(pool, policy)
    eject(pool[0], 0.0, policy)
    assert may_eject(pool, policy)
    eject(pool[1], 0.0, policy)
    assert not may_eject(pool, policy)  # half the pool is out
    single = [OutlierState()]
    assert may_eject(single, outliers(max_ejection_percent=10))


def test_success_rate_ejects_the_outlier_only() -> None:
    policy = outliers(minimum_hosts=3, request_volume=20, stdev_factor=1.0)
    pool = [OutlierState() for _ in range(4)]
    for index, failures in enumerate([0, 1, 0, 15]):
        for call in range(50):
            pool[index].record(success=call >= failures, gateway_failure=False)
    result = sweep(pool, now=0.0, policy=policy)
    assert result.ejected == [3]
    assert pool[3].ejected and not any(s.ejected for s in pool[:3])
    assert all(s.calls == 0 for s in pool)  # a new interval starts


def test_success_rate_needs_volume_and_enough_hosts() -> None:
    policy = outliers(minimum_hosts=3, request_volume=20, stdev_factor=1.0)
    pool = [OutlierState() for _ in range(3)]
    for index, failures in enumerate([0, 0, 10]):
        for call in range(19 if index == 0 else 30):  # one endpoint below the volume
            pool[index].record(success=call >= failures, gateway_failure=False)
    assert sweep(pool, 0.0, policy).ejected == []
    uniform = [OutlierState() for _ in range(3)]  # all equally bad: nobody is an outlier
    for state in uniform:
        for call in range(30):
            state.record(success=call % 2 == 0, gateway_failure=False)
    assert sweep(uniform, 0.0, policy).ejected == []


def test_outlier_policy_from_the_manifest() -> None:
    spec = OutlierDetection.model_validate({"baseEjectionTime": "1m", "interval": "500ms",
                                            "maxEjectionPercent": 30})
    declared = OutlierPolicy.from_spec(spec)
    assert (declared.base_ejection, declared.interval, declared.max_ejection_percent) == \
        (60.0, 0.5, 30)
    assert (outliers().consecutive_failures, outliers().base_ejection) == (5, 10.0)


# ---------------------------------------------------------------------------- budgets


def test_retry_budget_is_a_share_of_recent_calls_plus_a_floor() -> None:
    clock = Clock()
    budget = ShareBudget(percent=20, min_per_second=0, window=10, clock=clock)
    for _ in range(100):
        budget.deposit()
    granted = sum(budget.try_withdraw() for _ in range(100))
    assert granted == 20
    floor = ShareBudget(percent=0, min_per_second=2, window=10, clock=clock)
    assert sum(floor.try_withdraw() for _ in range(100)) == 20  # 2/s over 10 s, no calls


def test_retry_budget_forgets_calls_older_than_the_window() -> None:
    clock = Clock()
    budget = ShareBudget(percent=50, min_per_second=0, window=5, clock=clock)
    for _ in range(10):
        budget.deposit()
    assert budget.try_withdraw()
    clock.now += 3
    assert budget.deposited == 10 and budget.withdrawn == 1
    clock.now += 3  # the first second left the window
    assert not budget.try_withdraw()
    assert budget.deposited == 0 and budget.withdrawn == 0
    clock.now += 1000  # a long pause empties everything at once
    budget.deposit()
    budget.deposit()
    assert budget.try_withdraw() and not budget.try_withdraw()


# ---------------------------------------------------------------------------- hedging


def test_hedge_delay_follows_the_recent_percentile() -> None:
    window = LatencyWindow(percentile=95, size=100, refresh_every=10, min_samples=20)
    for _ in range(19):
        window.record(0.001)
    assert hedge_delay(window, 0.0) is None  # too few samples to know the tail
    for index in range(81):
        window.record(0.050 if index % 10 == 0 else 0.001)  # 9 slow of the last 100
    assert hedge_delay(window, 0.0) == pytest.approx(0.050)
    for _ in range(100):  # the slow ones leave the window
        window.record(0.002)
    assert hedge_delay(window, 0.0) == pytest.approx(0.002)
    assert hedge_delay(window, 0.010) == pytest.approx(0.010)  # never sooner than min_delay


# ---------------------------------------------------------------------------- canary, retry


def test_canary_split_follows_the_weight() -> None:
    rng = random.Random(3)
    share = sum(choose_canary(10, None, rng) for _ in range(20_000)) / 20_000
    assert share == pytest.approx(0.10, abs=0.01)
    assert not any(choose_canary(0, None, rng) for _ in range(100))
    assert all(choose_canary(100, b"s", rng) for _ in range(100))


def test_sessions_stick_and_move_only_when_the_weight_crosses_them() -> None:
    rng = random.Random(3)
    sessions = [f"user-{i}".encode() for i in range(2000)]
    at_10 = {s: choose_canary(10, s, rng) for s in sessions}
    assert at_10 == {s: choose_canary(10, s, rng) for s in sessions}  # sticky
    assert sum(at_10.values()) / len(sessions) == pytest.approx(0.10, abs=0.03)
    at_30 = {s: choose_canary(30, s, rng) for s in sessions}
    # Raising the weight moves sessions to the canary only; none comes back.
    assert all(at_30[s] for s in sessions if at_10[s])
    assert session_bucket(b"user-1") == session_bucket(b"user-1")


def test_retry_rules() -> None:
    never_sent = {"delivered": False, "safe": False, "other_endpoint": False}
    assert may_retry(UNAVAILABLE, **never_sent)  # nothing ran: always safe
    assert not may_retry(UNAVAILABLE, delivered=True, safe=False, other_endpoint=True)
    assert may_retry(UNAVAILABLE, delivered=True, safe=True, other_endpoint=False)
    assert may_retry(RESOURCE_EXHAUSTED, delivered=True, safe=True, other_endpoint=True)
    assert not may_retry(RESOURCE_EXHAUSTED, delivered=True, safe=True, other_endpoint=False)
    assert not may_retry(13, delivered=True, safe=True, other_endpoint=True)  # INTERNAL
