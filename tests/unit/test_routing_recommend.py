"""Recommendations: canary traffic, capacity, caching, parallel steps; approval; what the
controller learns from the changes it made. Pure code, plain data."""

from __future__ import annotations

from typing import Any

import pytest

from packetflow.manifests import load_text
from packetflow.operator.routing import parallel, recommend
from packetflow.operator.routing.decide import decide
from packetflow.operator.routing.model import (
    NAN,
    Effect,
    Observation,
    Series,
    State,
    Target,
    Tuning,
    VersionStats,
)
from packetflow.spec import Capability, CapabilitySpec

TUNING = Tuning(interval_s=15, canary_soak_s=300, effect_window_s=300, cooloff_s=3600)


def spec(**fields: Any) -> CapabilitySpec:
    return CapabilitySpec.model_validate({"intent": "x",
                                          "implementation": {"builtin": {"name": "echo"}},
                                          **fields})


def flat(rate: float = 10.0, p99: float = 0.05, errors: float = 0.0, n: int = 120,
         service: float = 0.02, in_flight: float = 1.0) -> Series:
    return Series(step=15.0, end=n * 15.0, rate=(rate,) * n, errors=(errors,) * n,
                  p99=(p99,) * n, service=(service,) * n, service_p99=(service * 2,) * n,
                  in_flight=(in_flight,) * n)


CANARY = spec(slo={"latencyP99Ms": 100, "availability": 99.9},
              canary={"weight": 20, "implementation": {"builtin": {"name": "echo"}}})
HEALTHY = VersionStats(rate=10, error_ratio=0.0, p99=0.04)


def observe(versions: dict[str, VersionStats], **extra: Any) -> Observation:
    return Observation(flat(), 2, 2, versions=versions, **extra)


def test_canary_breaching_the_slo_is_rolled_back_at_once() -> None:
    bad = VersionStats(rate=2, error_ratio=0.05, p99=0.04)
    decision = decide(observe({"stable": HEALTHY, "canary": bad}),
                      Target("Capability", "c", CANARY), State(), 1000.0, TUNING)
    assert decision.weight == 0
    (applied,) = decision.applied
    assert applied.kind == "canary-rollback" and applied.risk == "safe"
    assert "errors 5.00% > 0.10%" in applied.reason
    # The rollback is measured like any applied change.
    assert [e.kind for e in decision.state.history] == ["canary-rollback"]


def test_a_degraded_canary_gets_less_traffic_and_a_degraded_stable_more() -> None:
    slower = VersionStats(rate=2, error_ratio=0.0, p99=0.09)  # within the SLO, 2x stable
    down = decide(observe({"stable": HEALTHY, "canary": slower}),
                  Target("Capability", "c", CANARY), State(), 1000.0, TUNING)
    assert down.weight == 10 and down.applied[0].kind == "weights"
    breaking = VersionStats(rate=10, error_ratio=0.0, p99=0.5)
    up = decide(observe({"stable": breaking, "canary": HEALTHY}),
                Target("Capability", "c", CANARY), State(), 1000.0, TUNING)
    assert up.weight == 40


def test_promotion_waits_for_the_soak_and_for_approval_unless_auto() -> None:
    target = Target("Capability", "c", CANARY)
    versions = {"stable": HEALTHY, "canary": HEALTHY}
    state = decide(observe(versions), target, State(), 1000.0, TUNING).state
    early = decide(observe(versions), target, state, 1200.0, TUNING)
    assert not early.recommendations  # healthy for 200 s of the 300 s soak
    later = decide(observe(versions), target, early.state, 1400.0, TUNING)
    (promotion,) = later.recommendations
    assert (promotion.kind, promotion.risk, promotion.phase) == \
        ("canary-promotion", "risky", "pending")
    assert promotion.change == {"canary": None, "implementation": {
        "python": None, "builtin": {"name": "echo", "config": {}}, "composition": None,
        "image": None, "mcp": None, "planner": None}}
    assert later.patch is None and later.weight is None  # nothing applied yet
    approved = decide(observe(versions, approve=promotion.id), target, later.state, 1415.0,
                      TUNING)
    assert approved.patch == promotion.change
    assert approved.applied[0].id == promotion.id
    auto = CANARY.model_copy(update={"canary": CANARY.canary.model_copy(  # type: ignore
        update={"promote": "auto"})})
    auto_target = Target("Capability", "c", auto)
    state = decide(observe(versions), auto_target, State(), 1000.0, TUNING).state
    done = decide(observe(versions), auto_target, state, 1400.0, TUNING)
    assert done.applied[0].kind == "canary-promotion" and done.applied[0].risk == "safe"
    assert done.patch is not None and done.patch["canary"] is None


def test_rejection_drops_a_recommendation_for_good() -> None:
    target = Target("Capability", "c", spec())
    repeating = observe({}, repeat_ratio=0.8)
    first = decide(repeating, target, State(), 0.0, TUNING)
    (cache,) = first.recommendations
    assert cache.kind == "cache" and cache.phase == "pending"
    assert cache.change == {"cache": {"ttl": "60s", "maxEntries": 10000}}
    again = decide(repeating, target, first.state, 15.0, TUNING)
    assert [r.id for r in again.recommendations] == [cache.id]  # same id while it holds
    rejected = decide(observe({}, repeat_ratio=0.8, reject=cache.id), target, again.state,
                      30.0, TUNING)
    assert [r.phase for r in rejected.recommendations] == ["rejected"]
    assert rejected.patch is None
    later = decide(repeating, target, rejected.state, 10_000.0, TUNING)
    assert not [r for r in later.recommendations if r.phase == "pending"]


def test_an_approval_naming_nothing_is_reported_once() -> None:
    target = Target("Capability", "c", spec())
    first = decide(observe({}, approve="cache-99"), target, State(), 0.0, TUNING)
    assert any("names no pending recommendation" in r for r in first.reasons)
    second = decide(observe({}, approve="cache-99"), target, first.state, 15.0, TUNING)
    assert not second.reasons


def test_no_cache_for_effects_or_without_repeats() -> None:
    assert not recommend.cache_drafts(observe({}, repeat_ratio=0.9), spec(effects=["network"]))
    assert not recommend.cache_drafts(observe({}, repeat_ratio=0.1), spec())
    assert not recommend.cache_drafts(observe({}, repeat_ratio=NAN), spec())


def busy_series(contended: bool) -> Series:
    """Load that varies 1..16 calls in flight; service time grows with it if contended."""
    flights = [1.0 + (i % 16) for i in range(64)]
    service = [0.01 * (1 + (f / 4 if contended else 0)) for f in flights]
    return Series(step=15.0, end=64 * 15.0, rate=(100.0,) * 64, service=tuple(service),
                  in_flight=tuple(flights))


def test_concurrency_and_resources_follow_how_calls_slow_down_under_load() -> None:
    refused = Observation(busy_series(False), 1, 1, rejected_ratio=0.05)
    (raise_it,) = recommend.capacity_drafts(refused, spec(concurrency=16))
    assert raise_it.change == {"concurrency": 32} and raise_it.risk == "risky"
    contended = Observation(busy_series(True), 1, 1)
    (lower,) = recommend.capacity_drafts(contended, spec(concurrency=16))
    assert lower.change == {"concurrency": 8}
    (cpu,) = recommend.capacity_drafts(contended, spec(
        concurrency=16, resources={"limits": {"cpu": "500m", "memory": "1Gi"}}))
    assert cpu.kind == "resources"
    assert cpu.change == {"resources": {"limits": {"cpu": "1000m", "memory": "1Gi"}}}
    assert not recommend.capacity_drafts(Observation(busy_series(False), 1, 1),
                                         spec(concurrency=16))


def test_changes_that_did_not_help_cool_off_and_those_that_helped_rank_first() -> None:
    before = {"p99": 0.2, "errorRatio": 0.0, "service": 0.1, "rate": 10.0}
    state = State(history=(Effect("cache-1", "cache", 0.0, before),
                           Effect("concurrency-2", "concurrency", 0.0, before)))
    n = 100
    # After the change p99 halved for... everything measured in the window after.
    improved = Observation(Series(15.0, n * 15.0, (10.0,) * n, (0.0,) * n, (0.1,) * n,
                                  (0.05,) * n), 1, 1)
    judged = recommend.judge(state, improved, 1000.0, TUNING)
    assert [e.verdict for e in judged.history] == ["helped", "helped"]
    assert judged.kind_score == {"cache": 1.0, "concurrency": 1.0}
    worse = Observation(Series(15.0, n * 15.0, (10.0,) * n, (0.0,) * n, (0.4,) * n,
                               (0.1,) * n), 1, 1)
    hurt = recommend.judge(state, worse, 1000.0, TUNING)
    assert [e.verdict for e in hurt.history] == ["hurt", "hurt"]
    assert hurt.cooloff["cache"] == 1000.0 + TUNING.cooloff_s
    # In cool-off, the kind is not proposed again.
    quiet = recommend.reconcile(recommend.cache_drafts(observe({}, repeat_ratio=0.9), spec()),
                                observe({}), hurt, 1100.0)
    assert not quiet.recommendations
    # Pending ones are listed best-ranked kind first.
    ranked = State(kind_score={"concurrency": 3.0, "cache": -1.0})
    drafts = [*recommend.cache_drafts(observe({}, repeat_ratio=0.9), spec()),
              recommend.Draft("concurrency", {"concurrency": 2}, "r", "e", "risky")]
    listed = recommend.reconcile(drafts, observe({}), ranked, 0.0).recommendations
    assert [r.kind for r in listed] == ["concurrency", "cache"]


def test_history_is_bounded() -> None:
    effects = tuple(Effect(f"k-{i}", "k", float(i), {}, verdict="helped") for i in range(30))
    kept = recommend.record_applied(State(history=effects), (), observe({}), 100.0, TUNING)
    assert len(kept.history) == TUNING.history_limit
    assert kept.history[-1].id == "k-29"


# ------------------------------------------------------------------------- parallel steps

PIPELINE = """
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: lookup}
spec:
  intent: Look up
  requires: {q: {type: string}}
  provides: {answer: {type: string}}
  implementation: {builtin: {name: transform, config: {expression: "{answer: q}"}}}
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: store}
spec:
  intent: Store
  requires: {q: {type: string}}
  provides: {answer: {type: string}}
  effects: [state-write]
  implementation: {builtin: {name: transform, config: {expression: "{answer: q}"}}}
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: report}
spec:
  intent: Report
  requires: {q: {type: string}}
  implementation:
    composition:
      steps:
        - {name: a, call: {capability: lookup, input: {q: input.q}}}
        - {name: b, call: {capability: lookup, input: {q: input.q}}}
        - {name: c, call: {capability: lookup, input: {q: steps.a.answer}}}
        - {name: d, call: {capability: lookup, input: {q: "join('', [steps.b.answer, steps.c.answer])"}}}
      output: "{a: steps.a.answer, d: steps.d.answer}"
"""  # noqa: E501


def loaded(text: str) -> dict[str, Capability]:
    result = load_text(text, "test.yaml")
    assert not result.errors, result.errors
    return {c.name: c for c in result.manifests if isinstance(c, Capability)}


def test_independent_steps_are_found_and_joined() -> None:
    caps = loaded(PIPELINE)
    peers = {name: cap.spec for name, cap in caps.items()}
    composition = caps["report"].spec.implementation.composition
    assert composition is not None
    # a and b read only the input; c reads a, so the run stops there.
    assert parallel.independent_groups(composition, peers) == [(0, 1)]
    grouping = parallel.propose(caps["report"], peers, caps.values())
    assert grouping is not None and grouping.labels == ("a", "b")
    steps = grouping.composition.model_dump(by_alias=True, exclude_none=True)["steps"]
    assert steps[0]["name"] == "parallel_a_b"
    assert set(steps[0]["parallel"]["branches"]) == {"a", "b"}
    assert steps[1]["call"]["input"] == {"q": "steps.parallel_a_b.a.answer"}
    assert "steps.parallel_a_b.b.answer" in steps[2]["call"]["input"]["q"]
    assert grouping.composition.output == "{a: steps.parallel_a_b.a.answer, d: steps.d.answer}"
    drafts = recommend.parallel_drafts(Target("Capability", "report", caps["report"].spec,
                                              peers), caps["report"])
    assert drafts[0].risk == "risky" and drafts[0].kind == "parallel-steps"


@pytest.mark.parametrize("why,steps", [
    ("a step declares effects",
     "- {name: a, call: {capability: store, input: {q: input.q}}}\n"
     "- {name: b, call: {capability: lookup, input: {q: input.q}}}"),
    ("the second reads last",
     "- {name: a, call: {capability: lookup, input: {q: input.q}}}\n"
     "- {name: b, call: {capability: lookup, input: {q: last.answer}}}"),
    ("the second takes last implicitly",
     "- {name: a, call: {capability: lookup, input: {q: input.q}}}\n"
     "- {name: b, call: {capability: lookup}}"),
    ("the result is the last step's output",
     "- {name: a, call: {capability: lookup, input: {q: input.q}}}\n"
     "- {name: b, call: {capability: lookup, input: {q: input.q}}}"),
    ("a wildcard over steps",
     "- {name: a, call: {capability: lookup, input: {q: input.q}}}\n"
     "- {name: b, call: {capability: lookup, input: {q: \"join('', steps.*.answer)\"}}}"),
])
def test_nothing_is_proposed_without_proof(why: str, steps: str) -> None:
    text = PIPELINE.split("---\napiVersion: packetflow.io/v1alpha1\nkind: Capability\n"
                          "metadata: {name: report}")[0] + (
        "---\napiVersion: packetflow.io/v1alpha1\nkind: Capability\nmetadata: {name: r}\n"
        "spec:\n  intent: R\n  requires: {q: {type: string}}\n  implementation:\n"
        "    composition:\n      steps:\n"
        + "".join(f"        {line}\n" for line in steps.splitlines()))
    caps = loaded(text)
    peers = {name: cap.spec for name, cap in caps.items()}
    assert parallel.propose(caps["r"], peers, caps.values()) is None, why
