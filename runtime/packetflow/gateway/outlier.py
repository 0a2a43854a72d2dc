"""Outlier ejection with Envoy's semantics, as plain state and pure decisions.

* **Consecutive gateway failures**: ``consecutive_failures`` in a row (UNAVAILABLE, a lost or
  refused connection) eject the endpoint at once.
* **Ejection time grows with repeats**: the nth ejection in a row lasts ``n x base`` (at most
  ``max_ejection``); each interval an endpoint spends in service takes one off ``n``.
* **A cap on the ejected share**: at most ``max_ejection_percent`` of a pool is out at once,
  but at least one endpoint may always be ejected (so a pool of one can be "all ejected").
* **Success-rate ejection**: every ``interval``, endpoints with at least ``request_volume``
  calls are compared; with at least ``minimum_hosts`` of them, any whose success rate is
  below ``mean - stdev_factor x stdev`` is ejected.

Failures that are the caller's own (bad input, not found) count as successes: the endpoint
did its job.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from packetflow.spec import OutlierDetection, duration_seconds


@dataclass(frozen=True)
class OutlierPolicy:
    """:class:`packetflow.spec.OutlierDetection` in seconds (its defaults are the spec's)."""

    consecutive_failures: int
    interval: float
    base_ejection: float
    max_ejection: float
    max_ejection_percent: int
    minimum_hosts: int
    request_volume: int
    stdev_factor: float

    @classmethod
    def from_spec(cls, spec: OutlierDetection) -> OutlierPolicy:
        """The policy a manifest (or routes file) declares."""
        return cls(spec.consecutive_failures, duration_seconds(spec.interval),
                   duration_seconds(spec.base_ejection_time),
                   duration_seconds(spec.max_ejection_time), spec.max_ejection_percent,
                   spec.success_rate_minimum_hosts, spec.success_rate_request_volume,
                   spec.success_rate_stdev_factor)


@dataclass
class OutlierState:
    """One endpoint's record: failures in a row, this interval's calls, its ejections."""

    consecutive: int = 0
    calls: int = 0
    failures: int = 0
    ejections: int = 0  # the multiplier of the next ejection's length, less one
    ejected_until: float | None = None

    @property
    def ejected(self) -> bool:
        """Whether the endpoint is out of service."""
        return self.ejected_until is not None

    def record(self, success: bool, gateway_failure: bool) -> None:
        """Count one finished call (``gateway_failure`` implies not ``success``)."""
        self.calls += 1
        if not success:
            self.failures += 1
        self.consecutive = self.consecutive + 1 if gateway_failure else 0


def may_eject(states: Sequence[OutlierState], policy: OutlierPolicy) -> bool:
    """Whether one more endpoint of this pool may be ejected now."""
    ejected = sum(1 for state in states if state.ejected)
    allowed = max(1, len(states) * policy.max_ejection_percent // 100)
    return ejected < allowed


def eject(state: OutlierState, now: float, policy: OutlierPolicy) -> float:
    """Eject for ``n x base`` seconds (n = ejections in a row); returns the length."""
    state.ejections += 1
    length = min(policy.base_ejection * state.ejections,
                 max(policy.base_ejection, policy.max_ejection))
    state.ejected_until = now + length
    state.consecutive = 0
    return length


def consecutive_ejection_due(state: OutlierState, policy: OutlierPolicy) -> bool:
    """Whether the failures in a row have reached the ejection threshold."""
    return not state.ejected and state.consecutive >= policy.consecutive_failures


@dataclass
class Sweep:
    """What one interval's sweep decided, as indices into the pool."""

    returned: list[int] = field(default_factory=list)
    ejected: list[int] = field(default_factory=list)


def sweep(states: Sequence[OutlierState], now: float, policy: OutlierPolicy) -> Sweep:
    """The interval's work: end ejections that are over, take one off the repeat count of
    endpoints in service, eject success-rate outliers, start a new interval's counts."""
    result = Sweep()
    for index, state in enumerate(states):
        if state.ejected_until is not None and state.ejected_until <= now:
            state.ejected_until = None
            state.consecutive = 0
            result.returned.append(index)
        elif not state.ejected and state.ejections:
            state.ejections -= 1
    rates = {index: 1.0 - state.failures / state.calls for index, state in enumerate(states)
             if not state.ejected and state.calls >= policy.request_volume}
    if len(rates) >= policy.minimum_hosts:
        mean = statistics.fmean(rates.values())
        threshold = mean - policy.stdev_factor * statistics.pstdev(rates.values())
        for index in sorted(rates, key=rates.__getitem__):
            if rates[index] < threshold and not math.isclose(rates[index], threshold) \
                    and may_eject(states, policy):
                eject(states[index], now, policy)
                result.ejected.append(index)
    for state in states:
        state.calls = state.failures = 0
    return result
