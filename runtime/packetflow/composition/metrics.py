"""Per-step metrics of compositions, on the runtime's registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from packetflow.metrics import LATENCY_BUCKETS


class StepMetrics:
    """``packetflow_step_duration_seconds{composition,step}``, attempts and failures.

    Create one per registry (families register once) and share it between handlers.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.duration = Histogram(
            "packetflow_step_duration_seconds",
            "Time a composition step took, retries included.",
            ["composition", "step"], buckets=LATENCY_BUCKETS, registry=registry)
        self.attempts = Counter(
            "packetflow_step_attempts", "Attempts of composition steps (retries count).",
            ["composition", "step"], registry=registry)
        self.failures = Counter(
            "packetflow_step_failures", "Composition steps that ended in an error, by code.",
            ["composition", "step", "code"], registry=registry)

    def observe(self, composition: str, step: str, seconds: float, attempts: int,
                outcome: str) -> None:
        """Record one finished step."""
        self.duration.labels(composition, step).observe(seconds)
        self.attempts.labels(composition, step).inc(attempts)
        if outcome != "OK":
            self.failures.labels(composition, step, outcome).inc()
