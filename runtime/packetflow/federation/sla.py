"""SLA measurement: calls (and probes) fall into tumbling windows; each closed window is
judged against the SLA's p99 latency and availability."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from packetflow.spec import Sla, duration_seconds

# Outcomes that are the exporter's fault: they count against availability. A caller's own
# mistakes (bad input, no permission, past its rate limit) do not.
FAILURE_CODES = frozenset({"INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED", "UNKNOWN"})


def counts_as_failure(code: str) -> bool:
    """Whether a call ending with ``code`` breaks availability."""
    return code in FAILURE_CODES


@dataclass(frozen=True)
class Sample:
    """One call that reached the capability: when, how long, whether it failed."""

    at: float
    latency_s: float
    ok: bool


@dataclass(frozen=True)
class SlaReport:
    """One window's figures and the objectives it broke (empty: none)."""

    window_start: float
    calls: int
    availability: float | None  # percent
    p99_ms: float | None
    breaches: tuple[str, ...]


def p99(latencies: Sequence[float]) -> float:
    """Nearest-rank 99th percentile."""
    ordered = sorted(latencies)
    return ordered[max(1, math.ceil(0.99 * len(ordered))) - 1]


def evaluate(sla: Sla, samples: Sequence[Sample], window_start: float = 0.0) -> SlaReport:
    """Judge ``samples`` (one window) against ``sla``; a window without calls breaks nothing."""
    if not samples:
        return SlaReport(window_start, 0, None, None, ())
    availability = 100.0 * sum(s.ok for s in samples) / len(samples)
    latency = p99([s.latency_s for s in samples]) * 1000.0
    breaches = []
    if sla.latency_p99_ms is not None and latency > sla.latency_p99_ms:
        breaches.append(f"p99 latency {latency:.1f} ms > {sla.latency_p99_ms:g} ms")
    if sla.availability is not None and availability < sla.availability:
        breaches.append(f"availability {availability:.2f}% < {sla.availability:g}%")
    return SlaReport(window_start, len(samples), round(availability, 3), round(latency, 3),
                     tuple(breaches))


@dataclass
class SlaMeter:
    """Samples of one (export, peer) in the current window; closed windows are judged."""

    sla: Sla
    window_s: float = 0.0
    start: float = -math.inf
    samples: list[Sample] = field(default_factory=list)
    breaches: int = 0
    last: SlaReport | None = None

    def __post_init__(self) -> None:
        self.window_s = self.window_s or duration_seconds(self.sla.window)

    def observe(self, sample: Sample) -> SlaReport | None:
        """Add a sample; returns the report of the window it closed, if it closed one."""
        report = self.close(sample.at)
        self.samples.append(sample)
        return report

    def close(self, now: float) -> SlaReport | None:
        """Judge the current window if ``now`` is past it (then start the next)."""
        start = math.floor(now / self.window_s) * self.window_s
        if start == self.start:
            return None
        report = None
        if self.samples:
            report = evaluate(self.sla, self.samples, self.start)
            self.breaches += bool(report.breaches)
            self.last = report
        self.start, self.samples = start, []
        return report
