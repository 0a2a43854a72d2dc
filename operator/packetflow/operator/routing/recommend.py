"""Recommendations beyond replicas, their approval, and what the controller learns from them.

Each generator looks at one signal and proposes at most one change (a JSON merge patch of the
spec). Safe changes are applied at once; risky ones wait for ``packetflow.io/approve=<id>``
(or are dropped by ``packetflow.io/reject=<id>``). Every applied change is measured in a
window before and one after; a kind of change that did not help is not proposed again for a
cool-off, and kinds that helped are listed first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from packetflow.operator.routing import parallel
from packetflow.operator.routing.model import (
    Effect,
    Observation,
    Recommendation,
    Risk,
    Series,
    State,
    Target,
    Tuning,
    VersionStats,
    finite,
)
from packetflow.spec import IMPLEMENTATION_KINDS, Capability, CapabilitySpec

# Kinds the controller never holds back: they protect the objective.
PROTECTIVE = frozenset({"canary-rollback", "weights"})
# A repeat share of calls above this makes caching worth proposing.
CACHE_REPEATS = 0.3
# A verdict needs the score to move by this much (relative) either way.
EFFECT_THRESHOLD = 0.05
# Recommendations listed besides the pending ones (the latest applied or rejected).
KEEP_DONE = 10
# Service time at high concurrency this much above low concurrency means contention.
CONTENTION = 1.5


@dataclass(frozen=True)
class Draft:
    """A change a generator proposes; :func:`reconcile` gives it an id and a phase."""

    kind: str
    change: dict[str, Any]
    reason: str
    expected_effect: str
    risk: Risk


# ------------------------------------------------------------------------- generators


def canary_drafts(observed: Observation, spec: CapabilitySpec, state: State, now: float,
                  tuning: Tuning) -> tuple[list[Draft], State]:
    """Weights away from a degraded version, rollback on an SLO breach, promotion when the
    canary has been healthy for ``tuning.canary_soak_s``."""
    canary = spec.canary
    stable, candidate = observed.versions.get("stable"), observed.versions.get("canary")
    if canary is None or candidate is None or stable is None \
            or candidate.rate * tuning.effect_window_s < tuning.min_canary_calls:
        return [], state.evolve(canary_healthy_since=None)
    latency = (spec.slo.latency_p99_ms / 1e3 if spec.slo and spec.slo.latency_p99_ms
               else None)
    availability = spec.slo.availability if spec.slo else None
    canary_misses = candidate.breaches(latency, availability)
    stable_misses = stable.breaches(latency, availability)
    weight = canary.weight
    if canary_misses and not stable_misses:
        if weight == 0:
            return [], state.evolve(canary_healthy_since=None)
        return [Draft("canary-rollback", {"canary": {"weight": 0}},
                      f"canary misses the SLO ({'; '.join(canary_misses)}) while stable meets "
                      "it", "calls go back to the stable version", "safe")], \
            state.evolve(canary_healthy_since=None)
    if _worse(candidate, stable) and weight > 0:
        return [Draft("weights", {"canary": {"weight": weight // 2}},
                      f"canary is degraded against stable ({_compare(candidate, stable)})",
                      f"canary weight {weight} -> {weight // 2}: fewer calls reach it",
                      "safe")], state.evolve(canary_healthy_since=None)
    if stable_misses and not canary_misses and weight < 100:
        raised = min(100, max(2 * weight, weight + 10))
        return [Draft("weights", {"canary": {"weight": raised}},
                      f"stable misses the SLO ({'; '.join(stable_misses)}) and the canary "
                      "meets it", f"canary weight {weight} -> {raised}", "safe")], state
    since = state.canary_healthy_since if state.canary_healthy_since is not None else now
    state = state.evolve(canary_healthy_since=since)
    if weight == 0 or now - since < tuning.canary_soak_s:
        return [], state
    return [_promotion(spec, now - since)], state


def _worse(candidate: VersionStats, stable: VersionStats) -> bool:
    """Clearly worse than stable: twice the errors (and >0.1% more), or 1.5x the p99."""
    errors = finite(candidate.error_ratio) and finite(stable.error_ratio) and \
        candidate.error_ratio > 2 * stable.error_ratio + 0.001
    slower = finite(candidate.p99) and finite(stable.p99) and candidate.p99 > 1.5 * stable.p99
    return errors or slower


def _compare(candidate: VersionStats, stable: VersionStats) -> str:
    return (f"errors {candidate.error_ratio:.2%} vs {stable.error_ratio:.2%}, "
            f"p99 {candidate.p99 * 1e3:.0f} ms vs {stable.p99 * 1e3:.0f} ms")


def _promotion(spec: CapabilitySpec, healthy_s: float) -> Draft:
    """Make the canary the stable version: its implementation and resources, no canary."""
    canary = spec.canary
    assert canary is not None
    risk: Risk = "safe" if canary.promote == "auto" else "risky"
    reason = f"canary met the SLO and matched stable for {healthy_s / 60:.0f} min"
    if canary.image is not None:
        # The stable version has no image field to carry the canary's over.
        return Draft("canary-promotion", {"canary": {"weight": 100}},
                     reason + "; it runs its own image, so all calls go to it (edit the "
                     "manifest to finish)", "every call served by the canary", risk)
    change: dict[str, Any] = {"canary": None}
    if canary.implementation is not None:
        chosen = canary.implementation.kind
        change["implementation"] = {
            kind: (canary.implementation.model_dump(by_alias=True, exclude_none=True)[kind]
                   if kind == chosen else None) for kind in IMPLEMENTATION_KINDS}
    if canary.resources is not None:
        change["resources"] = canary.resources.model_dump(by_alias=True, exclude_none=True)
    return Draft("canary-promotion", change, reason,
                 "the canary becomes the stable version", risk)


def capacity_drafts(observed: Observation, spec: CapabilitySpec) -> list[Draft]:
    """``concurrency`` and ``resources`` changes from how service time moves with load."""
    series = observed.series
    if series is None:
        return []
    replicas = max(1, observed.ready_replicas)
    rejected = observed.rejected_ratio
    contention = _contention(series, replicas)
    if finite(rejected) and rejected > 0.01 and contention is not None \
            and contention < CONTENTION:
        raised = min(100_000, spec.concurrency * 2)
        return [Draft("concurrency", {"concurrency": raised},
                      f"{rejected:.1%} of calls are refused at the concurrency limit "
                      f"({spec.concurrency}) while calls do not slow down under load",
                      f"fewer RESOURCE_EXHAUSTED: concurrency {spec.concurrency} -> {raised}",
                      "risky")]
    if contention is not None and contention >= CONTENTION:
        cpu = (spec.resources.limits.get("cpu") if spec.resources else None)
        if cpu is not None:
            raised_cpu = _scaled_cpu(cpu, 2.0)
            limits = dict(spec.resources.limits) if spec.resources else {}
            limits["cpu"] = raised_cpu
            return [Draft("resources", {"resources": {"limits": limits}},
                          f"calls take {contention:.1f}x longer when busy: the CPU limit "
                          f"({cpu}) throttles them", f"cpu limit {cpu} -> {raised_cpu}",
                          "risky")]
        lowered = max(1, spec.concurrency // 2)
        if lowered < spec.concurrency:
            return [Draft("concurrency", {"concurrency": lowered},
                          f"calls take {contention:.1f}x longer when busy: concurrent calls "
                          "slow each other down", f"concurrency {spec.concurrency} -> "
                          f"{lowered}: calls wait their turn instead", "risky")]
    return []


def _contention(series: Series, replicas: int) -> float | None:
    """Mean service time when busiest over when least busy (per replica), if both are seen."""
    pairs = [(f / replicas, s) for f, s in zip(series.in_flight, series.service, strict=False)
             if finite(f) and finite(s) and s > 0]
    if len(pairs) < 8:
        return None
    pairs.sort()
    quarter = max(2, len(pairs) // 4)
    low, high = pairs[:quarter], pairs[-quarter:]
    if high[0][0] <= 2 * max(low[-1][0], 0.5):
        return None  # load barely varied: nothing to compare
    return (sum(s for _, s in high) / len(high)) / (sum(s for _, s in low) / len(low))


def _scaled_cpu(quantity: str, factor: float) -> str:
    millis = float(quantity[:-1]) if quantity.endswith("m") else float(quantity) * 1000
    return f"{math.ceil(millis * factor)}m"


def cache_drafts(observed: Observation, spec: CapabilitySpec) -> list[Draft]:
    """Result caching for a capability without effects whose inputs repeat."""
    if spec.effects or spec.cache is not None or not finite(observed.repeat_ratio) \
            or observed.repeat_ratio < CACHE_REPEATS:
        return []
    share = min(1.0, observed.repeat_ratio)  # two rate() windows need not line up exactly
    return [Draft("cache", {"cache": {"ttl": "60s", "maxEntries": 10_000}},
                  f"{share:.0%} of calls repeat an input seen in the last "
                  "1024 distinct ones, and the capability declares no effects",
                  f"about {share:.0%} of calls answered from memory", "risky")]


def parallel_drafts(target: Target, capability: Capability | None) -> list[Draft]:
    """Independent pipeline steps of a composition joined into one parallel step."""
    if capability is None:
        return []
    grouping = parallel.propose(capability, target.peers)
    if grouping is None:
        return []
    composition = grouping.composition.model_dump(by_alias=True, exclude_none=True)
    return [Draft("parallel-steps", {"implementation": {"composition": composition}},
                  f"steps {', '.join(grouping.labels)} read nothing of each other and their "
                  "capabilities declare no effects",
                  "their latency becomes the slowest step's instead of the sum", "risky")]


# ------------------------------------------------------------------------- lifecycle


@dataclass(frozen=True)
class Outcome:
    """What :func:`reconcile` settled this tick."""

    recommendations: tuple[Recommendation, ...]
    apply: tuple[Recommendation, ...]  # to apply now (safe, or approved)
    state: State


def reconcile(drafts: Sequence[Draft], observed: Observation, state: State,
              now: float) -> Outcome:
    """Merge this tick's drafts into the known recommendations; settle approvals."""
    known = list(state.recommendations)
    apply: list[Recommendation] = []
    sequence = state.sequence
    cooloff = dict(state.cooloff)
    rejected_changes = [r.change for r in known if r.phase == "rejected"]
    for index, rec in enumerate(known):
        if rec.phase != "pending":
            continue
        if observed.reject == rec.id:
            known[index] = _with_phase(rec, "rejected", now)
            rejected_changes.append(rec.change)
        elif observed.approve == rec.id:
            known[index] = _with_phase(rec, "applied", now)
            apply.append(known[index])
    for draft in drafts:
        if draft.kind not in PROTECTIVE and cooloff.get(draft.kind, -math.inf) > now:
            continue
        if draft.change in rejected_changes:
            continue  # a person said no to exactly this
        pending = next((r for r in known if r.phase == "pending" and r.kind == draft.kind),
                       None)
        if pending is not None and pending.change == draft.change:
            continue
        if pending is not None:
            known[known.index(pending)] = _with_phase(pending, "superseded", now)
        sequence += 1
        rec = Recommendation(f"{draft.kind}-{sequence}", draft.kind, draft.change,
                             draft.reason, draft.expected_effect, draft.risk,
                             "applied" if draft.risk == "safe" else "pending", now)
        known.append(rec)
        if rec.phase == "applied":
            apply.append(rec)
    scores = state.kind_score
    waiting = sorted((r for r in known if r.phase == "pending"),
                     key=lambda r: (-scores.get(r.kind, 0.0), r.since))
    # Replica changes are routine: only the latest is listed.
    done = [r for r in known if r.phase != "pending" and r.kind != "replicas"][-KEEP_DONE:]
    latest = [r for r in known if r.kind == "replicas"][-1:]
    done = sorted([*done, *latest], key=lambda r: r.since)
    listed = (*waiting, *done)
    return Outcome(listed, tuple(apply),
                   state.evolve(recommendations=listed, sequence=sequence, cooloff=cooloff))


def _with_phase(rec: Recommendation, phase: Any, now: float) -> Recommendation:
    return Recommendation(rec.id, rec.kind, rec.change, rec.reason, rec.expected_effect,
                          rec.risk, phase, now)


# ------------------------------------------------------------------------- feedback loop


def snapshot(observed: Observation, start: float, end: float) -> dict[str, float]:
    """The metrics a change is judged by, over ``[start, end]``: p99, error ratio, mean
    service time, rate, satisfaction."""
    series = observed.series
    if series is None:
        return {}
    seconds = end - start

    def mean(name: str) -> float:
        values = series.window(name, seconds, ending=end)
        return sum(values) / len(values) if values else math.nan

    rate, errors = mean("rate"), mean("errors")
    return {"p99": mean("p99"), "errorRatio": errors / rate if rate > 0 else math.nan,
            "service": mean("service"), "rate": rate, "satisfaction": observed.satisfaction}


def record_applied(state: State, applied: Sequence[Recommendation], observed: Observation,
                   now: float, tuning: Tuning) -> State:
    """Start measuring each applied change (replica changes are routine: not recorded)."""
    entries = [Effect(r.id, r.kind, now, snapshot(observed, now - tuning.effect_window_s, now))
               for r in applied if r.kind != "replicas"]
    history = (*state.history, *entries)
    return state.evolve(history=_bounded(history, tuning.history_limit))


def judge(state: State, observed: Observation, now: float, tuning: Tuning) -> State:
    """Judge changes whose after-window has passed; cool off kinds that did not help."""
    settle = max(60.0, tuning.interval_s)
    history, cooloff, scores = list(state.history), dict(state.cooloff), dict(state.kind_score)
    for index, effect in enumerate(history):
        end = effect.applied_at + settle + tuning.effect_window_s
        if effect.verdict != "pending" or now < end:
            continue
        after = snapshot(observed, effect.applied_at + settle, end)
        if not after or not finite(after.get("rate", math.nan)):
            continue  # no data for the window yet: judge on a later tick
        verdict = _verdict(effect.before, after)
        history[index] = Effect(effect.id, effect.kind, effect.applied_at, effect.before,
                                after, verdict)
        scores[effect.kind] = max(-5.0, min(5.0, scores.get(effect.kind, 0.0)
                                            + (1.0 if verdict == "helped" else -1.0)))
        if verdict != "helped" and effect.kind not in PROTECTIVE:
            cooloff[effect.kind] = now + tuning.cooloff_s
    return state.evolve(history=_bounded(tuple(history), tuning.history_limit),
                        cooloff=cooloff, kind_score=scores)


def _verdict(before: Mapping[str, float], after: Mapping[str, float]) -> Any:
    """helped / hurt / no-effect: p99 and service time relative, errors and satisfaction
    absolute (a point of errors weighs like 10% of latency)."""
    score = 0.0
    for key in ("p99", "service"):
        b, a = before.get(key, math.nan), after.get(key, math.nan)
        if finite(b) and finite(a) and b > 0:
            score += (b - a) / b
    b, a = before.get("errorRatio", math.nan), after.get("errorRatio", math.nan)
    if finite(b) and finite(a):
        score += 10 * (b - a)
    b, a = before.get("satisfaction", math.nan), after.get("satisfaction", math.nan)
    if finite(b) and finite(a):
        score += a - b
    if score > EFFECT_THRESHOLD:
        return "helped"
    if score < -EFFECT_THRESHOLD:
        return "hurt"
    return "no-effect"


def _bounded(history: tuple[Effect, ...], limit: int) -> tuple[Effect, ...]:
    """The newest ``limit`` entries, dropping judged ones before pending ones."""
    if len(history) <= limit:
        return history
    judged = [e for e in history if e.verdict != "pending"]
    drop = set(id(e) for e in judged[:len(history) - limit])
    kept = tuple(e for e in history if id(e) not in drop)
    return kept[-limit:]
