"""Prometheus metrics of the runtime, on a registry of its own so several runtimes can coexist."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latency buckets from 0.5 ms: most capability calls are in-process and fast.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0, 60.0)


def _task_counter() -> Callable[[], float]:
    """Counts the tasks of the loop running now (read from the metrics server's thread)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # made outside a loop (a unit test): nothing to count
        return lambda: 0.0
    return lambda: float(len(asyncio.all_tasks(loop)))


@dataclass
class RuntimeMetrics:
    """The runtime's metric families."""

    registry: CollectorRegistry = field(
        default_factory=lambda: CollectorRegistry(auto_describe=True))

    def __post_init__(self) -> None:
        self.calls = Counter(
            "packetflow_capability_calls", "Capability calls by outcome code.",
            ["capability", "code"], registry=self.registry)
        self.duration = Histogram(
            "packetflow_capability_call_duration_seconds",
            "Time from input received to reply, per capability.",
            ["capability"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tasks = Gauge(
            "packetflow_event_loop_tasks",
            "Asyncio tasks alive on the runtime's event loop (steady under steady load; "
            "growth without bound is a leak).", registry=self.registry)
        self.tasks.set_function(_task_counter())
        self.in_flight = Gauge(
            "packetflow_capability_in_flight", "Calls currently running, per capability.",
            ["capability"], registry=self.registry)
        self.repeated_inputs = Counter(
            "packetflow_capability_repeated_inputs",
            "Calls of a capability without effects whose input equals one of its last 1024 "
            "distinct inputs (what a result cache could serve).",
            ["capability"], registry=self.registry)
        self.cache_hits = Counter(
            "packetflow_capability_cache_hits",
            "Calls answered from the capability's result cache (spec.cache).",
            ["capability"], registry=self.registry)
        self.contract_violations = Counter(
            "packetflow_contract_violations",
            "Outputs that broke the capability's provides contract.",
            ["capability"], registry=self.registry)
        self.unauthenticated = Counter(
            "packetflow_unauthenticated_calls",
            "Calls refused because the caller proved no identity of this cluster, by reason "
            "(expired, wrong-trust-domain, no-client-certificate, ...).",
            ["reason"], registry=self.registry)
        self.access_denied = Counter(
            "packetflow_access_denied",
            "Calls refused by a capability's or actor type's access policy, by the deciding "
            "rule (deny[0], allow, default:namespace, ...).",
            ["kind", "name", "rule"], registry=self.registry)
