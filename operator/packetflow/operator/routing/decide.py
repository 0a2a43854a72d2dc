"""``decide``: one tick of the routing controller, as a pure function.

(observation, target, state, now) -> Decision: the replica count and canary weight to write,
the spec patch of approved or safe changes, the recommendations to list (safe ones applied,
risky ones waiting for approval), the status conditions and the state to remember. The
cluster loop, ``packetflow controller --target`` and the benchmark all call it.
"""

from __future__ import annotations

from typing import Any

from packetflow.operator.routing import recommend
from packetflow.operator.routing.model import (
    Decision,
    Observation,
    Recommendation,
    State,
    Target,
    Tuning,
)
from packetflow.operator.routing.recommend import Draft
from packetflow.operator.routing.scaling import plan_replicas
from packetflow.operator.status import Condition
from packetflow.spec import Capability, CapabilitySpec, ObjectMeta


def decide(observed: Observation, target: Target, state: State, now: float,
           tuning: Tuning | None = None) -> Decision:
    """Decide what to change on ``target`` at ``now`` from what was ``observed``."""
    tuning = tuning or Tuning()
    spec = target.spec
    conditions = [metrics_condition(observed)]
    drafts: list[Draft] = []
    figures: dict[str, float] = {}
    if spec.scaling is not None:
        plan = plan_replicas(observed, spec, tuning, state, now)
        state, figures = plan.state, plan.figures
        if plan.replicas is not None and plan.replicas != observed.replicas:
            drafts.append(Draft("replicas", {"replicas": plan.replicas}, plan.reason,
                                f"{observed.replicas if observed.replicas is not None else '?'}"
                                f" -> {plan.replicas} replicas", "safe"))
        conditions += scaling_conditions(observed, spec.scaling.min_replicas,
                                         spec.scaling.max_replicas, figures, plan.reason)
    if observed.series is not None and isinstance(spec, CapabilitySpec):
        canary, state = recommend.canary_drafts(observed, spec, state, now, tuning)
        drafts += canary
        drafts += recommend.capacity_drafts(observed, spec)
        drafts += recommend.cache_drafts(observed, spec)
        drafts += recommend.parallel_drafts(target, _as_capability(target.name, spec))
    outcome = recommend.reconcile(drafts, observed, state, now)
    state = recommend.record_applied(outcome.state, outcome.apply, observed, now, tuning)
    state = recommend.judge(state, observed, now, tuning)
    reasons, state = _annotation_notes(observed, outcome.recommendations, state)
    replicas, weight, patch = split_changes(outcome.apply)
    reasons = [*(f"{rec.id}: {rec.reason}" for rec in outcome.apply), *reasons]
    return Decision(replicas=replicas, weight=weight, patch=patch,
                    recommendations=outcome.recommendations, applied=outcome.apply,
                    reasons=tuple(reasons), conditions=tuple(conditions), state=state,
                    figures=figures)


def split_changes(applied: tuple[Recommendation, ...]
                  ) -> tuple[int | None, int | None, dict[str, Any] | None]:
    """Replicas (the scale subresource), the canary weight alone (what the gateway reads)
    and every other change merged into one spec patch."""
    replicas = weight = None
    patch: dict[str, Any] = {}
    for rec in applied:
        change = dict(rec.change)
        if "replicas" in change:
            replicas = int(change.pop("replicas"))
        canary = change.get("canary")
        if isinstance(canary, dict) and set(canary) == {"weight"}:
            weight = int(canary["weight"])
            change.pop("canary")
        patch = merge(patch, change)
    return replicas, weight, patch or None


def merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """Combine two JSON merge patches (RFC 7386): the second wins where they overlap."""
    out = dict(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def metrics_condition(observed: Observation) -> Condition:
    """``MetricsAvailable``: whether Prometheus answered, and if not, why."""
    if observed.series is None:
        return Condition("MetricsAvailable", False, "PrometheusUnavailable",
                         observed.error or "no metrics")
    return Condition("MetricsAvailable", True, "QueriesSucceeded",
                     "Prometheus answered every query")


def scaling_conditions(observed: Observation, least: int, most: int,
                       figures: dict[str, float], reason: str) -> list[Condition]:
    """``ScalingActive`` (deciding from metrics, or why not) and ``ScalingLimited`` (the
    load wants more or fewer replicas than the bounds allow)."""
    if observed.series is None or "needed" not in figures:
        return [Condition("ScalingActive", False, "NoMetrics",
                          f"replicas are left as they are: {reason}")]
    needed = int(figures["needed"])
    limited = needed > most or needed < least
    bound = "maxReplicas" if needed > most else "minReplicas"
    return [Condition("ScalingActive", True, "Scaling", reason),
            Condition("ScalingLimited", limited, f"At{bound[0].upper()}{bound[1:]}"
                      if limited else "WithinBounds",
                      f"the load needs {needed} replicas; {bound} is "
                      f"{most if needed > most else least}" if limited
                      else f"{needed} needed, within {least}..{most}")]


def _annotation_notes(observed: Observation, recommendations: tuple[Recommendation, ...],
                      state: State) -> tuple[list[str], State]:
    """Say once when an approve/reject annotation names no pending recommendation."""
    seen = (observed.approve, observed.reject)
    if seen == state.annotations_seen:
        return [], state
    notes = []
    for verb, value in (("approve", observed.approve), ("reject", observed.reject)):
        if value and not any(r.id == value and r.phase in ("applied", "rejected")
                             for r in recommendations):
            notes.append(f"packetflow.io/{verb}={value} names no pending recommendation")
    return notes, state.evolve(annotations_seen=seen)


def _as_capability(name: str, spec: CapabilitySpec) -> Capability:
    """The resource as a Capability model (what the composition checks take)."""
    return Capability(apiVersion="packetflow.io/v1alpha1", kind="Capability",
                      metadata=ObjectMeta(name=name), spec=spec)
