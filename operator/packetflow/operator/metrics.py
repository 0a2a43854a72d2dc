"""Reconcile metrics (Prometheus): how often the operator reconciles, how it ends, how long.

A reconcile is one run for one Capability or Actor: for an event of its own (trigger
``create``, ``update``, ``resume``) or a queued one (``child-changed``, ``child-deleted``,
``relist``, ``resync``, ``retry``). Child events that need no work are not reconciles; they
are counted in ``packetflow_operator_child_events`` by outcome.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

# Reconciles are API round trips: milliseconds on a quiet cluster, seconds when it is busy.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class Outcome:
    """What a timed reconcile ended with; the handler sets ``result`` before returning."""

    result: str = "ok"


@dataclass
class OperatorMetrics:
    """Counters and histograms of one operator; a fresh registry keeps tests independent."""

    registry: CollectorRegistry = field(default_factory=lambda: REGISTRY)
    # Raw durations, kept only when asked (the benchmark's percentiles); unbounded otherwise.
    keep_durations: bool = False

    def __post_init__(self) -> None:
        self.reconciles = Counter(
            "packetflow_operator_reconciles", "Reconciles by trigger and result",
            ["trigger", "result"], registry=self.registry)
        self.duration = Histogram(
            "packetflow_operator_reconcile_duration_seconds", "Reconcile duration by trigger",
            ["trigger"], buckets=_BUCKETS, registry=self.registry)
        self.child_writes = Counter(
            "packetflow_operator_child_writes", "Child objects created or patched",
            ["kind", "verb"], registry=self.registry)
        # What each child event amounted to: most are the operator's own writes coming back
        # (own-write) and cost nothing; only `queued` ones lead to a reconcile of the owner.
        self.child_events = Counter(
            "packetflow_operator_child_events", "Child watch events by what they amounted to",
            ["outcome"], registry=self.registry)
        self.durations: dict[str, list[float]] = {}
        self._child_event_counters: dict[str, Any] = {}

    def count_child_event(self, outcome: str) -> None:
        """Count one child event by its outcome (the labelled counter looked up once)."""
        counter = self._child_event_counters.get(outcome)
        if counter is None:
            counter = self._child_event_counters[outcome] = self.child_events.labels(outcome)
        counter.inc()

    @contextmanager
    def timed(self, trigger: str) -> Iterator[Outcome]:
        """Count and time one reconcile; an exception counts as ``error`` unless the handler
        named the failure (``conflict``, ``api-error``) before raising."""
        outcome = Outcome()
        start = time.perf_counter()
        try:
            yield outcome
        except BaseException:
            if outcome.result == "ok":
                outcome.result = "error"
            raise
        finally:
            elapsed = time.perf_counter() - start
            self.reconciles.labels(trigger, outcome.result).inc()
            self.duration.labels(trigger).observe(elapsed)
            if self.keep_durations:
                self.durations.setdefault(trigger, []).append(elapsed)
