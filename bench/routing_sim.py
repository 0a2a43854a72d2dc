"""A discrete-event simulation of one capability under a load trace, for ``bench routing``.

Calls arrive as a Poisson process whose rate follows the trace, wait in one FIFO queue in
front of the replicas (a gateway, Knative's activator), run on a free concurrency slot of a
ready replica for a service time drawn from a measured distribution, and give up after
``timeout_s`` in the queue (a dropped call). Replicas start ``startup_s`` after they are asked
for and cost from that moment; a removed replica takes no new calls and finishes its own.

Two views of the run exist, as in a cluster: what each policy may observe (per-second
average concurrency for the KPA, as its scraper reports it; Prometheus-like counters,
gauges and histograms sampled every scrape interval for the controller), and the ground
truth (every call's latency) used only to score SLO-violation minutes.
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from packetflow.metrics import LATENCY_BUCKETS

BUCKETS = (*LATENCY_BUCKETS, math.inf)


class Trace:
    """Requests per second over time: piecewise linear between points, flat after the last.

    Two points at the same time make a step.
    """

    def __init__(self, points: Sequence[tuple[float, float]]) -> None:
        if not points:
            raise ValueError("a trace needs at least one point")
        self.times = [t for t, _ in points]
        self.rates = [r for _, r in points]
        self.duration = self.times[-1]

    def rate(self, at: float) -> float:
        """Requests per second at time ``at``."""
        index = bisect.bisect_right(self.times, at)
        if index == 0:
            return self.rates[0]
        if index >= len(self.times):
            return self.rates[-1]
        t0, t1 = self.times[index - 1], self.times[index]
        r0, r1 = self.rates[index - 1], self.rates[index]
        return r0 if t1 == t0 else r0 + (r1 - r0) * (at - t0) / (t1 - t0)

    def mean_rate(self, start: float, end: float) -> float:
        """The average rate over ``[start, end)`` (midpoint rule on quarters)."""
        quarter = (end - start) / 4
        return sum(self.rate(start + quarter * (k + 0.5)) for k in range(4)) / 4


def poisson(rng: random.Random, mean: float) -> int:
    """A Poisson sample (normal approximation above 50, exact below)."""
    if mean <= 0:
        return 0
    if mean > 50:
        return max(0, round(rng.gauss(mean, math.sqrt(mean))))
    limit, k, product = math.exp(-mean), 0, rng.random()
    while product > limit:
        k += 1
        product *= rng.random()
    return k


@dataclass
class Replica:
    """One pod: asked for at ``created``, ready at ``ready_at``, gone at ``removed``."""

    id: int
    created: float
    ready_at: float
    removed: float | None = None

    def ready(self, now: float) -> bool:
        """Serving calls at ``now``."""
        return self.removed is None and self.ready_at <= now


@dataclass
class Second:
    """What happened in one second, as counters would record it."""

    arrivals: int = 0
    ok: int = 0
    dropped: int = 0
    latency: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))  # end to end
    service: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))
    service_sum: float = 0.0
    in_system_area: float = 0.0  # integral of calls in the system (queued + running)
    in_service: int = 0          # gauges, sampled at the start of the second
    pending: int = 0


@dataclass
class Minute:
    """Ground truth of one minute (by arrival): calls, slow calls, dropped calls."""

    calls: int = 0
    slow: int = 0
    dropped: int = 0

    def violated(self) -> bool:
        """p99 above the objective (nearest rank: more than 1% slow), or any call dropped."""
        return self.dropped > 0 or self.slow > self.calls - math.ceil(0.99 * self.calls)


@dataclass
class Result:
    """A policy's score on a trace."""

    violation_minutes: int
    replica_minutes: float
    calls: int
    dropped: int
    max_replicas: int


Decide = Callable[["Simulation", float], int]


class Simulation:
    """One run of a trace under one scaling policy (``decide(sim, now)`` every ``tick_s``)."""

    def __init__(self, trace: Trace, service_times: Sequence[float], *, concurrency: int,
                 slo_s: float, startup_s: float, timeout_s: float, initial_replicas: int,
                 seed: int) -> None:
        self.trace = trace
        self.service_times = list(service_times)
        self.concurrency = concurrency
        self.slo_s = slo_s
        self.startup_s = startup_s
        self.timeout_s = timeout_s
        self.rng = random.Random(seed)
        self.seconds: list[Second] = []
        self.minutes: list[Minute] = []
        self.replicas: list[Replica] = []
        self.free: list[int] = []  # one entry per free slot: the replica's index
        self.queue: deque[float] = deque()  # arrival times of waiting calls
        self.events: list[tuple[float, int, int]] = []  # (time, kind, replica)
        self.in_service = 0
        self.in_system = 0
        self.area_until = 0.0
        for _ in range(initial_replicas):
            self._add_replica(-startup_s)

    # ------------------------------------------------------------------ the world

    def _second(self, at: float) -> Second:
        index = int(at)
        while len(self.seconds) <= index:
            self.seconds.append(Second())
        return self.seconds[index]

    def _minute(self, at: float) -> Minute:
        index = int(at // 60)
        while len(self.minutes) <= index:
            self.minutes.append(Minute())
        return self.minutes[index]

    def _advance_area(self, to: float) -> None:
        """Integrate calls-in-system up to ``to``, split at second boundaries."""
        at = self.area_until
        while at < to:
            edge = min(to, math.floor(at) + 1.0)
            self._second(at).in_system_area += self.in_system * (edge - at)
            at = edge
        self.area_until = max(self.area_until, to)

    def _add_replica(self, now: float) -> None:
        replica = Replica(len(self.replicas), now, now + self.startup_s)
        self.replicas.append(replica)
        heapq.heappush(self.events, (replica.ready_at, 0, replica.id))

    def _remove_replica(self, now: float) -> None:
        live = [r for r in self.replicas if r.removed is None]
        # Pods still starting go first, then the newest (as a ReplicaSet picks).
        victim = max(live, key=lambda r: (r.ready_at > now, r.created))
        victim.removed = now

    def _start(self, arrival: float, now: float) -> None:
        """Run a call that arrived at ``arrival`` on a free slot, now."""
        index = self.free.pop()
        service = self.rng.choice(self.service_times)
        self.in_service += 1
        heapq.heappush(self.events, (now + service, 1, index))
        latency = now - arrival + service
        done = self._second(now + service)
        done.ok += 1
        done.latency[bisect.bisect_left(BUCKETS, latency)] += 1
        done.service[bisect.bisect_left(BUCKETS, service)] += 1
        done.service_sum += service
        minute = self._minute(arrival)
        minute.calls += 1
        if latency > self.slo_s:
            minute.slow += 1

    def _take_free_slot(self) -> bool:
        """Whether a slot of a live replica is free (stale entries are dropped)."""
        while self.free:
            if self.replicas[self.free[-1]].removed is None:
                return True
            self.free.pop()
        return False

    def _drain_queue(self, now: float) -> None:
        while self.queue and self._take_free_slot():
            self._start(self.queue.popleft(), now)

    def _expire(self, now: float) -> None:
        """Drop queued calls whose wait passed the timeout, at the moment it passed."""
        while self.queue and self.queue[0] + self.timeout_s <= now:
            arrival = self.queue.popleft()
            gone = arrival + self.timeout_s
            self._advance_area(gone)
            self.in_system -= 1
            self._second(gone).dropped += 1
            minute = self._minute(arrival)
            minute.calls += 1
            minute.dropped += 1

    def _process_events(self, until: float) -> None:
        while self.events and self.events[0][0] <= until:
            at, kind, index = heapq.heappop(self.events)
            self._expire(at)
            self._advance_area(at)
            replica = self.replicas[index]
            if kind == 0:  # a replica became ready
                if replica.removed is None:
                    self.free.extend([index] * self.concurrency)
            else:  # a call finished
                self.in_service -= 1
                self.in_system -= 1
                if replica.removed is None:
                    self.free.append(index)
            self._drain_queue(at)

    def _arrive(self, at: float) -> None:
        self._process_events(at)
        self._expire(at)
        self._advance_area(at)
        self.in_system += 1
        self._second(at).arrivals += 1
        if not self.queue and self._take_free_slot():
            self._start(at, at)
        else:
            self.queue.append(at)

    def _scale_to(self, wanted: int, now: float) -> None:
        live = sum(1 for r in self.replicas if r.removed is None)
        for _ in range(wanted - live):
            self._add_replica(now)
        for _ in range(live - wanted):
            self._remove_replica(now)

    # ------------------------------------------------------------------ what policies see

    def ready_count(self, now: float) -> int:
        """Ready replicas at ``now`` (what Kubernetes reports)."""
        return sum(1 for r in self.replicas if r.ready(now))

    def live_count(self) -> int:
        """Replicas asked for and not removed (ready or starting)."""
        return sum(1 for r in self.replicas if r.removed is None)

    # ------------------------------------------------------------------ the run

    def run(self, decide: Decide, tick_s: float) -> Result:
        """Replay the trace, calling ``decide`` every ``tick_s``; score it."""
        duration = math.ceil(self.trace.duration)
        next_tick = tick_s
        replica_seconds = 0.0
        peak = self.live_count()
        for second in range(duration):
            self._process_events(second)
            self._expire(second)
            self._advance_area(second)
            sampled = self._second(second)
            sampled.in_service = self.in_service
            sampled.pending = len(self.queue)
            if second >= next_tick:
                next_tick += tick_s
                wanted = decide(self, float(second))
                if wanted != self.live_count():
                    self._scale_to(wanted, float(second))
            live = self.live_count()
            peak = max(peak, live)
            replica_seconds += live
            count = poisson(self.rng, self.trace.mean_rate(second, second + 1))
            for at in sorted(second + self.rng.random() for _ in range(count)):
                self._arrive(at)
        self._process_events(float(duration))
        self._expire(float(duration))
        scored = self.minutes[: duration // 60]
        return Result(
            violation_minutes=sum(1 for m in scored if m.violated()),
            replica_minutes=replica_seconds / 60,
            calls=sum(m.calls for m in scored),
            dropped=sum(m.dropped for m in scored),
            max_replicas=peak,
        )
