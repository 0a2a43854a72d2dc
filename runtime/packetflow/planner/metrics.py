"""The planner's metric families, once per registry (several planners may share one)."""

from __future__ import annotations

import weakref
from typing import ClassVar

from prometheus_client import CollectorRegistry, Counter, Histogram


class PlannerMetrics:
    """Plans by planner and outcome, planning time, executions, and model calls."""

    _by_registry: ClassVar[weakref.WeakKeyDictionary[CollectorRegistry, PlannerMetrics]] = \
        weakref.WeakKeyDictionary()

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.plans = Counter("packetflow_planner_plans", "Plans made, by planner (builtin, "
                             "model, cache) and outcome.", ["planner", "outcome"],
                             registry=registry)
        self.planning = Histogram("packetflow_planner_planning_duration_seconds",
                                  "Time from intent to checked plan.", registry=registry)
        self.executions = Counter("packetflow_planner_executions", "Plans executed, by "
                                  "outcome code.", ["code"], registry=registry)
        self.model_calls = Counter("packetflow_planner_model_calls", "Language model calls "
                                   "by the planner.", ["provider", "outcome"],
                                   registry=registry)
        self.model_duration = Histogram("packetflow_planner_model_call_duration_seconds",
                                        "Duration of the planner's language model calls.",
                                        ["provider"], registry=registry)

    @classmethod
    def of(cls, registry: CollectorRegistry | None) -> PlannerMetrics:
        """The families on ``registry`` (made on first use); unregistered without one."""
        if registry is None:
            return cls(None)
        found = cls._by_registry.get(registry)
        if found is None:
            found = cls._by_registry[registry] = cls(registry)
        return found
