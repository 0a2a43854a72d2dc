"""The two scaling policies ``bench routing`` compares, and what each may observe.

* :class:`Kpa`: Knative's KPA decider (knative/serving pkg/autoscaler/scaling/autoscaler.go):
  stable window 60 s, panic window 6 s (10%) entered at 200% of ready pods, target 70% of the
  concurrency target, scale up at most x1000 and down /2 per 2 s tick. The manifest's scaling
  maps onto it as a Knative Service's annotations would: min/max replicas to min-/max-scale,
  ``targetConcurrency`` (else ``concurrency``) to the target, ``scaleDownDelay`` to
  scale-down-delay (the max of the decisions within it). It sees what Knative's scraper
  reports: each second's average concurrency (calls queued in front of pods, as the
  activator reports them, plus running).
* :class:`Controller`: this project's ``decide()``, fed only what Prometheus would show it:
  counters, gauges and histograms scraped every ``scrape_s``, queried as ``rate(x[2*scrape])``
  and ``histogram_quantile(0.99, ...)``, never the simulator's internals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from bench.routing_sim import BUCKETS, Simulation
from packetflow.operator.routing.decide import decide
from packetflow.operator.routing.model import NAN, Observation, Series, State, Target, Tuning

# ------------------------------------------------------------------------------- KPA


@dataclass
class Kpa:
    """Knative's KPA decider, tick by tick (concurrency metric, stable + panic windows)."""

    target: float                 # per-pod concurrency target before utilisation
    min_replicas: int
    max_replicas: int
    stable_window_s: int = 60
    panic_window_s: int = 6
    target_utilisation: float = 0.7
    panic_threshold: float = 2.0
    max_scale_up_rate: float = 1000.0
    max_scale_down_rate: float = 2.0
    scale_down_delay_s: float = 0.0
    panic_time: float | None = None
    max_panic_pods: int = 0
    delayed: list[tuple[float, int]] = field(default_factory=list)

    def __call__(self, sim: Simulation, now: float) -> int:
        """The KPA's desired pod count at ``now``."""
        second = int(now)
        stable = _window_average(sim, second, self.stable_window_s)
        panic = _window_average(sim, second, self.panic_window_s)
        ready = max(1.0, float(sim.ready_count(now)))
        target_value = max(0.01, self.target * self.target_utilisation)
        max_up = math.ceil(self.max_scale_up_rate * ready)
        max_down = math.floor(ready / self.max_scale_down_rate)
        dspc = math.ceil(stable / target_value)
        dppc = math.ceil(panic / target_value)
        desired_stable = int(min(max(dspc, max_down), max_up))
        desired_panic = int(min(max(dppc, max_down), max_up))
        over = dppc / ready >= self.panic_threshold
        if over:  # begin panicking, or extend the panic
            self.panic_time = now
        elif self.panic_time is not None and self.panic_time + self.stable_window_s < now:
            self.panic_time, self.max_panic_pods = None, 0
        desired = desired_stable
        if self.panic_time is not None:
            desired = max(desired, desired_panic)
            self.max_panic_pods = max(self.max_panic_pods, desired)
            desired = self.max_panic_pods
        if self.scale_down_delay_s > 0:
            # max.TimeWindow: the highest decision within the delay (2 s buckets).
            self.delayed = [(t, n) for t, n in self.delayed
                            if t > now - self.scale_down_delay_s] + [(now, desired)]
            desired = max(n for _, n in self.delayed)
        # The PodAutoscaler applies min/max scale to the decider's answer.
        return min(self.max_replicas, max(self.min_replicas, desired))


def _window_average(sim: Simulation, second: int, window: int) -> float:
    """Average per-second concurrency over the last ``window`` seconds (TimedFloat64Buckets:
    only seconds since the first write count)."""
    first = max(0, second - window)
    values = [sim.seconds[s].in_system_area for s in range(first, second)
              if s < len(sim.seconds)]
    return sum(values) / len(values) if values else 0.0


# ------------------------------------------------------------------------------- Prometheus


def histogram_quantile(quantile: float, buckets: list[float]) -> float:
    """Prometheus' histogram_quantile over bucket increases (not cumulative) for BUCKETS."""
    total = sum(buckets)
    if total <= 0:
        return NAN
    rank = quantile * total
    cumulative = 0.0
    for index, count in enumerate(buckets):
        previous = cumulative
        cumulative += count
        if cumulative >= rank and count > 0:
            upper = BUCKETS[index]
            if math.isinf(upper):
                return BUCKETS[index - 1]
            lower = BUCKETS[index - 1] if index > 0 else 0.0
            return lower + (upper - lower) * (rank - previous) / count
    return BUCKETS[-2]


@dataclass
class PrometheusView:
    """What a Prometheus scraping the simulated gateway and runtimes every ``scrape_s``
    answers to the controller's range queries; samples are cached once in the past."""

    scrape_s: int
    history_s: int
    samples: list[tuple[float, ...]] = field(default_factory=list)

    def series(self, sim: Simulation, now: float) -> Series:
        """The range query result at ``now``: samples at every scrape time up to ``now``."""
        last = int(now // self.scrape_s) * self.scrape_s
        while (len(self.samples) + 1) * self.scrape_s <= last:
            self.samples.append(self._sample(sim, (len(self.samples) + 1) * self.scrape_s))
        keep = max(1, self.history_s // self.scrape_s)
        window = self.samples[-keep:]
        columns = list(zip(*window, strict=True)) if window else [()] * 7
        return Series(step=float(self.scrape_s), end=float(last),
                      rate=tuple(columns[0]), errors=tuple(columns[1]),
                      p99=tuple(columns[2]), service=tuple(columns[3]),
                      service_p99=tuple(columns[4]), in_flight=tuple(columns[5]),
                      pending=tuple(columns[6]))

    def _sample(self, sim: Simulation, at: int) -> tuple[float, ...]:
        """rate()/histogram_quantile() over ``[at - 2*scrape, at)``; gauges at ``at``."""
        window = 2 * self.scrape_s
        seconds = sim.seconds[max(0, at - window):at]
        arrivals = sum(s.arrivals for s in seconds)
        dropped = sum(s.dropped for s in seconds)
        ok = sum(s.ok for s in seconds)
        latency = [sum(s.latency[b] for s in seconds) for b in range(len(BUCKETS))]
        service = [sum(s.service[b] for s in seconds) for b in range(len(BUCKETS))]
        service_sum = sum(s.service_sum for s in seconds)
        gauge = sim.seconds[at] if at < len(sim.seconds) else None
        return (arrivals / window, dropped / window, histogram_quantile(0.99, latency),
                service_sum / ok if ok else NAN, histogram_quantile(0.99, service),
                float(gauge.in_service) if gauge else NAN,
                float(gauge.pending) if gauge else NAN)


@dataclass
class Controller:
    """This project's decide(), ticking every ``tuning.interval_s`` on the Prometheus view."""

    target: Target
    tuning: Tuning
    view: PrometheusView
    state: State = field(default_factory=State)
    replicas: int | None = None
    figures: dict[str, float] = field(default_factory=dict)

    def __call__(self, sim: Simulation, now: float) -> int:
        """The replica count decide() writes at ``now`` (unchanged when it says None)."""
        current = sim.live_count() if self.replicas is None else self.replicas
        observed = Observation(series=self.view.series(sim, now), replicas=current,
                               ready_replicas=sim.ready_count(now))
        decision = decide(observed, self.target, self.state, now, self.tuning)
        self.state = decision.state
        self.figures = decision.figures
        if decision.replicas is not None:
            self.replicas = decision.replicas
        return current if decision.replicas is None else decision.replicas
