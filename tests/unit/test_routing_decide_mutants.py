"""decide() wires each recommendation source to the spec and the metrics it was given."""

from __future__ import annotations

from packetflow.operator.routing.decide import decide
from packetflow.operator.routing.model import Effect, Observation, Series, State, Target, Tuning
from tests.unit.test_routing_recommend import PIPELINE, loaded, spec

TUNING = Tuning(interval_s=15, canary_soak_s=300, effect_window_s=300, cooloff_s=3600)


def steady(n: int = 100, p99: float = 0.1, in_flight: float = 1.0,
           service: tuple[float, ...] | None = None) -> Series:
    return Series(step=15.0, end=n * 15.0, rate=(10.0,) * n, errors=(0.0,) * n, p99=(p99,) * n,
                  service=service or (0.05,) * n, in_flight=(in_flight,) * n)


def pipeline_target() -> Target:
    """The report composition, whose steps a and b read nothing of each other."""
    caps = loaded(PIPELINE)
    return Target("Capability", "report", caps["report"].spec,
                  {name: cap.spec for name, cap in caps.items()})


def test_without_scaling_the_figures_are_empty() -> None:
    decision = decide(Observation(steady(), 1, 1), Target("Capability", "x", spec()), State(),
                      0.0, TUNING)
    assert decision.figures == {}


def test_parallel_steps_are_recommended_from_the_resource_itself_only_with_metrics() -> None:
    target = pipeline_target()
    with_metrics = decide(Observation(steady(), 1, 1), target, State(), 0.0, TUNING)
    assert [(r.kind, r.phase) for r in with_metrics.recommendations] == [
        ("parallel-steps", "pending")]
    # Without metrics the controller recommends nothing at all (it says why in a condition).
    blind = decide(Observation(None, 1, 1, error="down"), target, State(), 0.0, TUNING)
    assert blind.recommendations == () and blind.patch is None


def test_capacity_is_recommended_from_the_targets_own_concurrency() -> None:
    flights = tuple(1.0 + (i % 16) for i in range(64))
    series = Series(step=15.0, end=64 * 15.0, rate=(100.0,) * 64, service=(0.01,) * 64,
                    in_flight=flights)
    decision = decide(Observation(series, 1, 1, rejected_ratio=0.05),
                      Target("Capability", "x", spec(concurrency=16)), State(), 0.0, TUNING)
    assert [(r.kind, r.change) for r in decision.recommendations] == [
        ("concurrency", {"concurrency": 32})]


def test_applied_changes_are_judged_on_the_metrics_observed_this_tick() -> None:
    before = {"p99": 0.2, "errorRatio": 0.0, "service": 0.1, "rate": 10.0}
    state = State(history=(Effect("cache-1", "cache", 0.0, before),))
    decision = decide(Observation(steady(p99=0.1), 1, 1), Target("Capability", "x", spec()),
                      state, 1000.0, TUNING)
    assert [(e.id, e.verdict) for e in decision.state.history] == [("cache-1", "helped")]
    assert decision.state.kind_score == {"cache": 1.0}
