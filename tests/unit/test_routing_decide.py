"""decide() on a recorded metric series, and on what happens when metrics are missing.

tests/unit/data/routing_step_series.json was read from a real Prometheus (2.42, 1 s scrapes)
scraping ``packetflow dev`` serving a capability that sleeps 50 ms, under a generated load:
idle, 40 calls/s for 20 s, 3 s idle, 80 calls/s for 15 s, idle (see its "source").
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from packetflow.operator.routing.decide import (
    _annotation_notes,
    decide,
    merge,
    metrics_condition,
    scaling_conditions,
    split_changes,
)
from packetflow.operator.routing.model import (
    NAN,
    Observation,
    Recommendation,
    Series,
    State,
    Target,
    Tuning,
)
from packetflow.operator.status import Condition
from packetflow.spec import CapabilitySpec

RECORDED = Path(__file__).parent / "data" / "routing_step_series.json"
SPEC = CapabilitySpec.model_validate({
    "intent": "Take 50 ms", "implementation": {"builtin": {"name": "echo"}},
    "slo": {"latencyP99Ms": 1000},
    "scaling": {"minReplicas": 1, "maxReplicas": 10, "targetConcurrency": 1,
                "scaleDownDelay": "5s"}})
TUNING = Tuning(interval_s=1.0, startup_s=2.0)
TARGET = Target("Capability", "slow", SPEC)


def recorded() -> dict[str, list[float]]:
    series: dict[str, Any] = json.loads(RECORDED.read_text())["series"]
    return {k: [NAN if v is None else v for v in values] for k, values in series.items()
            if isinstance(values, list)}


def prefix(columns: dict[str, list[float]], upto: int, history: int) -> Series:
    """What a range query of ``history`` samples returns when the newest is ``upto``."""
    start = max(0, upto - history + 1)
    return Series(step=1.0, end=float(upto),
                  **{k: tuple(v[start:upto + 1]) for k, v in columns.items()})


def replay(history: int = 20) -> list[tuple[int, float, int]]:
    """(sample, rate, replicas written) at every tick, replicas taking effect at once."""
    columns = recorded()
    state, replicas = State(), 1
    out = []
    for upto in range(len(columns["rate"])):
        observed = Observation(prefix(columns, upto, history), replicas, replicas)
        decision = decide(observed, TARGET, state, float(upto), TUNING)
        state = decision.state
        replicas = decision.replicas if decision.replicas is not None else replicas
        out.append((upto, columns["rate"][upto], replicas))
    return out


def test_scales_up_on_each_step_and_back_down_after_the_delay() -> None:
    timeline = replay()
    at = {t: n for t, _, n in timeline}
    rates = {t: r for t, r, _ in timeline}
    first = [t for t, r in rates.items() if r == r and r > 30]
    second = [t for t, r in rates.items() if r == r and r > 60]
    # 40 calls/s of 50 ms at one call per replica: 2 in flight, so at least 2 replicas...
    assert max(at[t] for t in first) >= 2
    # ...and 80 calls/s at least 4, reached within a few seconds of the step.
    assert max(at[t] for t in second[:5]) >= 4
    # Never below what the load needs while it runs...
    assert min(at[t] for t in range(second[1], second[-1] + 1)) >= 4
    # ...and no scale-down within scaleDownDelay of a scale-up (no flapping).
    ups = [t for t in range(1, len(timeline)) if at[t] > at[t - 1]]
    downs = [t for t in range(1, len(timeline)) if at[t] < at[t - 1]]
    assert downs and all(t - max(u for u in ups if u < t) >= 5 for t in downs)
    # Idle again: back to minReplicas once the history has no burst left and the delay passed.
    assert timeline[-1][2] == 1
    came_down = next(t for t, _, n in timeline if t > second[-1] and n == 1)
    assert came_down - second[-1] >= 5  # not before scaleDownDelay


def test_a_long_history_keeps_headroom_for_the_bursts_it_saw() -> None:
    # With 90 s of history the steps are still in view at the end: replicas stay above the
    # minimum (the surprise they caused is planned for), within the bound.
    final = replay(history=90)[-1][2]
    assert 1 < final <= 10


def test_no_metrics_never_scales_and_says_why() -> None:
    observed = Observation(None, 6, 6, error="Prometheus at http://x did not answer")
    decision = decide(observed, TARGET, State(), 100.0, TUNING)
    assert decision.replicas is None
    by_type = {c.type: c for c in decision.conditions}
    assert by_type["MetricsAvailable"].status is False
    assert "did not answer" in by_type["MetricsAvailable"].message
    assert by_type["ScalingActive"].status is False


def test_prometheus_down_after_a_scale_up_keeps_replicas() -> None:
    columns = recorded()
    state, replicas = State(), 1
    for upto in range(60):  # into the 80 calls/s step
        decision = decide(Observation(prefix(columns, upto, 20), replicas, replicas), TARGET,
                          state, float(upto), TUNING)
        state = decision.state
        replicas = decision.replicas or replicas
    assert replicas >= 4
    for later in range(60, 120):  # metrics gone for a minute: nothing is scaled down
        decision = decide(Observation(None, replicas, replicas, error="down"), TARGET, state,
                          float(later), TUNING)
        state = decision.state
        assert decision.replicas is None


def test_below_min_replicas_is_lifted_even_without_metrics() -> None:
    decision = decide(Observation(None, None, 0, error="down"), TARGET, State(), 0.0, TUNING)
    assert decision.replicas == 1
    assert decision.applied[0].kind == "replicas" and decision.applied[0].risk == "safe"
    assert decision.applied[0].expected_effect == "? -> 1 replicas"  # none written before
    assert decision.reasons[0].startswith(f"{decision.applied[0].id}: ")


def test_a_scaling_decision_shows_its_figures_and_from_what_it_scaled() -> None:
    columns = recorded()
    state, decision = State(), None
    for upto in range(30):  # into the 40 calls/s step, from 1 replica written
        decision = decide(Observation(prefix(columns, upto, 20), 1, 1), TARGET, state,
                          float(upto), TUNING)
        state = decision.state
        if decision.replicas is not None:
            break
    assert decision is not None and decision.replicas is not None
    assert decision.figures["needed"] >= 2
    assert decision.applied[0].expected_effect == f"1 -> {decision.replicas} replicas"
    active = {c.type: c for c in decision.conditions}["ScalingActive"]
    assert active.status is True and active.message == decision.applied[0].reason


def test_metrics_condition_says_whether_prometheus_answered() -> None:
    assert metrics_condition(Observation(None, 1, 1)) == Condition(
        "MetricsAvailable", False, "PrometheusUnavailable", "no metrics")
    assert metrics_condition(Observation(None, 1, 1, error="timed out")).message == "timed out"
    assert metrics_condition(Observation(prefix(recorded(), 5, 5), 1, 1)) == Condition(
        "MetricsAvailable", True, "QueriesSucceeded", "Prometheus answered every query")


@pytest.mark.parametrize(("needed", "limited"), [
    (0, (True, "AtMinReplicas", "the load needs 0 replicas; minReplicas is 1")),
    (1, (False, "WithinBounds", "1 needed, within 1..3")),
    (3, (False, "WithinBounds", "3 needed, within 1..3")),
    (4, (True, "AtMaxReplicas", "the load needs 4 replicas; maxReplicas is 3")),
])
def test_scaling_is_limited_only_outside_the_bounds(needed: int,
                                                    limited: tuple[bool, str, str]) -> None:
    observed = Observation(prefix(recorded(), 5, 5), 1, 1)
    conditions = scaling_conditions(observed, 1, 3, {"needed": float(needed)}, "the reason")
    assert conditions == [Condition("ScalingActive", True, "Scaling", "the reason"),
                          Condition("ScalingLimited", *limited)]


def test_without_figures_scaling_is_inactive_and_says_why() -> None:
    for observed in (Observation(None, 1, 1), Observation(prefix(recorded(), 5, 5), 1, 1)):
        assert scaling_conditions(observed, 1, 3, {}, "no data") == [Condition(
            "ScalingActive", False, "NoMetrics", "replicas are left as they are: no data")]


def recommendation(rec_id: str, phase: str) -> Recommendation:
    return Recommendation(rec_id, "cache", {}, "why", "effect", "risky", phase,  # type: ignore[arg-type]
                          0.0)


def test_an_annotation_naming_no_pending_recommendation_is_said_once() -> None:
    observed = Observation(None, 1, 1, approve="r-9", reject="r-8")
    pending = (recommendation("r-9", "pending"), recommendation("r-7", "applied"))
    notes, state = _annotation_notes(observed, pending, State())
    assert notes == ["packetflow.io/approve=r-9 names no pending recommendation",
                     "packetflow.io/reject=r-8 names no pending recommendation"]
    assert _annotation_notes(observed, pending, state)[0] == []  # said once


@pytest.mark.parametrize("phase", ["applied", "rejected"])
def test_an_annotation_that_took_effect_needs_no_note(phase: str) -> None:
    taken = (recommendation("r-1", phase), recommendation("r-2", "pending"))
    for observed in (Observation(None, 1, 1, approve="r-1"),
                     Observation(None, 1, 1, reject="r-1")):
        assert _annotation_notes(observed, taken, State())[0] == []
    assert _annotation_notes(Observation(None, 1, 1, approve="r-2"), taken, State())[0] == [
        "packetflow.io/approve=r-2 names no pending recommendation"]


def test_limits_are_reported() -> None:
    spec = SPEC.model_copy(update={"scaling": SPEC.scaling.model_copy(  # type: ignore[union-attr]
        update={"max_replicas": 2})})
    columns = recorded()
    decision = None
    state = State()
    for upto in range(58):
        decision = decide(Observation(prefix(columns, upto, 20), 2, 2),
                          Target("Capability", "slow", spec), state, float(upto), TUNING)
        state = decision.state
    assert decision is not None
    limited = {c.type: c for c in decision.conditions}["ScalingLimited"]
    assert limited.status is True and limited.reason == "AtMaxReplicas"


def test_state_round_trips_through_status() -> None:
    timeline_state = State()
    columns = recorded()
    for upto in range(50):
        timeline_state = decide(Observation(prefix(columns, upto, 20), 2, 2), TARGET,
                                timeline_state, float(upto), TUNING).state
    status = timeline_state.to_status()
    back = State.from_status(json.loads(json.dumps(status)),
                             [r.to_status() for r in timeline_state.recommendations],
                             [e.to_status() for e in timeline_state.history])
    assert back.to_status() == status
    assert back.recommendations == timeline_state.recommendations
    assert State.from_status({"desired": "garbage"}) == State()  # unreadable: start fresh


@pytest.mark.parametrize("changes,expected", [
    ([{"replicas": 3}], (3, None, None)),
    ([{"canary": {"weight": 0}}], (None, 0, None)),
    ([{"concurrency": 8}, {"canary": None, "implementation": {"builtin": None}}],
     (None, None, {"concurrency": 8, "canary": None, "implementation": {"builtin": None}})),
])
def test_split_changes(changes: list[dict[str, Any]], expected: tuple[Any, ...]) -> None:
    recs = tuple(Recommendation(f"k-{i}", "k", c, "", "", "safe", "applied", 0.0)
                 for i, c in enumerate(changes))
    assert split_changes(recs) == expected


def test_merge_is_a_json_merge_patch_union() -> None:
    assert merge({"a": {"b": 1}, "c": 1}, {"a": {"d": 2}, "c": None}) == \
        {"a": {"b": 1, "d": 2}, "c": None}
    assert math.isnan(Series(1.0, 0.0, (NAN,)).last("rate"))
