"""``decide``: one tick of the routing controller, as a pure function.

(observation, target, state, now) -> Decision: the replica count and canary weight to write,
the recommendations to list (safe ones applied, risky ones waiting for approval), the status
conditions, and the state to remember. The cluster loop and the benchmark both call it.
"""

from __future__ import annotations

from packetflow.operator.routing.model import (
    Condition,
    Decision,
    Observation,
    State,
    Target,
    Tuning,
)
from packetflow.operator.routing.scaling import plan_replicas


def decide(observed: Observation, target: Target, state: State, now: float,
           tuning: Tuning | None = None) -> Decision:
    """Decide what to change on ``target`` at ``now`` from what was ``observed``."""
    tuning = tuning or Tuning()
    spec = target.spec
    conditions = [metrics_condition(observed)]
    reasons: list[str] = []
    replicas = None
    figures: dict[str, float] = {}
    if spec.scaling is not None:
        plan = plan_replicas(observed, spec, tuning, state, now)
        state, figures = plan.state, plan.figures
        if plan.replicas is not None and plan.replicas != observed.replicas:
            replicas = plan.replicas
            reasons.append(f"replicas {observed.replicas} -> {replicas}: {plan.reason}")
        conditions.append(Condition("ScalingActive", observed.series is not None,
                                    "Scaling" if observed.series is not None else "NoMetrics",
                                    plan.reason))
    return Decision(replicas=replicas, weight=None, patch=None, recommendations=(),
                    applied=(), reasons=tuple(reasons), conditions=tuple(conditions),
                    state=state, figures=figures)


def metrics_condition(observed: Observation) -> Condition:
    """``MetricsAvailable``: whether Prometheus answered, and if not, why."""
    if observed.series is None:
        return Condition("MetricsAvailable", False, "PrometheusUnavailable",
                         observed.error or "no metrics")
    return Condition("MetricsAvailable", True, "QueriesSucceeded",
                     "Prometheus answered every query")
