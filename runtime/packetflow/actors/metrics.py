"""Prometheus metrics of actors, on the runtime's registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from packetflow.metrics import LATENCY_BUCKETS


class ActorMetrics:
    """Active actors, activations, turn and store latency, reminders fired."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.active = Gauge("packetflow_actors_active", "Actors active in this process.",
                            ["actor_type"], registry=registry)
        self.activations = Counter("packetflow_actor_activations",
                                   "Actor activations (state loaded, lease taken).",
                                   ["actor_type"], registry=registry)
        self.turns = Histogram("packetflow_actor_turn_duration_seconds",
                               "Time of one turn from dequeue to committed state, by outcome.",
                               ["actor_type", "code"], buckets=LATENCY_BUCKETS,
                               registry=registry)
        self.store = Histogram("packetflow_actor_store_duration_seconds",
                               "Time of one store operation (a batch for SQLite group commits).",
                               ["actor_type", "operation"], buckets=LATENCY_BUCKETS,
                               registry=registry)
        self.reminders_fired = Counter("packetflow_actor_reminders_fired",
                                       "Reminders and schedules fired.", ["actor_type"],
                                       registry=registry)
