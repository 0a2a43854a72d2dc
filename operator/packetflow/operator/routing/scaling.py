"""Replica decisions: forecast the load for when new pods would be ready, size replicas with the
queueing model, scale up at once, scale down only after ``scaleDownDelay`` and a margin.

Pure: :func:`plan_replicas` maps (observation, spec, state, now) to a plan and a new state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from packetflow.operator.routing import capacity, forecast
from packetflow.operator.routing.model import (
    Observation,
    Series,
    State,
    Tuning,
    finite,
)
from packetflow.spec import ActorSpec, CapabilitySpec, Scaling, duration_seconds

# Slots per replica when an Actor (no per-process concurrency) sets no targetConcurrency.
ACTOR_SLOTS = 64
# Forecast band: plan for the forecast plus this many residual deviations.
BAND = 1.5
# Learning rates of the capacity correction: a miss the model did not predict costs more
# than a comfortable period earns.
MISS_FACTOR = 0.8
COMFORT_FACTOR = 1.02
# Without a latency objective, calls are assumed to take this many mean service times at p99.
TAIL_OVER_MEAN = 3.0
# Burst headroom: this quantile of the rises seen within one reaction time, over the history.
BURST_QUANTILE = 0.99
LEARNING_S = 600.0
# Periods looked for in the rate history: from 5 minutes to half the history.
SHORTEST_PERIOD_S = 300.0
PERIOD_RECHECK_S = 600.0


@dataclass(frozen=True)
class ScalePlan:
    """The replica count to write (None: leave it) and why."""

    replicas: int | None
    reason: str
    state: State
    figures: dict[str, float] = field(default_factory=dict)


def slots_per_replica(spec: CapabilitySpec | ActorSpec) -> int:
    """Calls a replica runs at once before more must wait: ``targetConcurrency`` when the
    manifest sets it, else the capability's ``concurrency`` limit."""
    assert spec.scaling is not None
    if spec.scaling.target_concurrency is not None:
        return max(1, math.ceil(spec.scaling.target_concurrency))
    return spec.concurrency if isinstance(spec, CapabilitySpec) else ACTOR_SLOTS


def wait_budget(spec: CapabilitySpec | ActorSpec, series: Series,
                service_s: float) -> float | None:
    """Seconds a call may wait and still meet the latency objective (None: no objective)."""
    if spec.slo is None or spec.slo.latency_p99_ms is None:
        return None
    tail = series.last("service_p99", back=3)
    if not finite(tail):
        tail = TAIL_OVER_MEAN * service_s
    return spec.slo.latency_p99_ms / 1e3 - tail


def plan_replicas(observed: Observation, spec: CapabilitySpec | ActorSpec, tuning: Tuning,
                  state: State, now: float) -> ScalePlan:
    """Decide the replica count of a resource with ``spec.scaling``."""
    scaling = spec.scaling
    assert scaling is not None
    current = observed.replicas
    series = observed.series
    if series is None or not finite(series.last("rate", back=2)):
        # No data: never scale down on it; only lift a count below the declared minimum.
        if current is None or current < scaling.min_replicas:
            return ScalePlan(scaling.min_replicas, "below minReplicas", state)
        return ScalePlan(None, observed.error or "no metrics for this capability yet", state)
    if current is None:
        current = max(observed.ready_replicas, scaling.min_replicas)

    if not finite(state.started):
        state = state.evolve(started=now)
    state = _learn_startup(state, observed, now)
    state, service_s = _learn_service(state, series)
    if not finite(service_s):
        # Calls but no duration yet (or no calls at all): nothing to size with; hold.
        bounded = _bounded(current, scaling)
        return ScalePlan(bounded if bounded != current else None,
                         "no call durations yet", state)
    slots = slots_per_replica(spec)
    budget = wait_budget(spec, series, service_s)
    startup = state.startup_s if finite(state.startup_s) else tuning.startup_s
    # The latency of the newest sample covers two scrape intervals before it: judge it by the
    # fewest replicas ready in that time (a scale-up late in the window did not serve it).
    span = 3 * series.step + tuning.interval_s
    seen = (*((t, n) for t, n in state.ready_seen if t > now - span),
            (now, observed.ready_replicas))
    state = state.evolve(ready_seen=seen)
    if now - state.started >= span:
        state = _learn_capacity(state, series, spec, budget, service_s, slots,
                                min(n for _, n in seen))
    effective_s = service_s / state.capacity_factor
    state, period = _seasonality(state, series, now)

    # When new pods would serve: after start-up, the next tick, and the metrics' own lag.
    horizon = math.ceil((startup + tuning.interval_s + series.step) / series.step)
    fitted = forecast.fit(series.rate, horizon=horizon, surprise_quantile=BURST_QUANTILE)
    expected, surprise = fitted.peak(horizon), fitted.surprise
    if period:
        # The seasonal fit adds what it expects from the time of day; when it has been
        # right out of sample, its smaller surprises stand.
        seasonal = forecast.fit(series.rate, period, horizon=horizon,
                                surprise_quantile=BURST_QUANTILE)
        expected = max(expected, seasonal.peak(horizon))
        if finite(seasonal.surprise):
            surprise = min(surprise, seasonal.surprise)
    rate_now = series.last("rate")
    backlog = series.last("pending")
    drain = backlog / max(startup, series.step) if finite(backlog) else 0.0
    band = BAND * fitted.residual * min(2.0, math.sqrt(horizon))
    # What the history says can arrive, beyond the forecast, before a reaction lands; a young
    # history says little, so until it spans LEARNING_S assume the load may double.
    learned = min(1.0, len(series.rate) * series.step / LEARNING_S)
    burst = max(surprise if finite(surprise) else 0.0, (1 - learned) * rate_now)
    planned = max(expected, rate_now) + max(band, burst) + drain

    if budget is not None and scaling.target_concurrency is None:
        needed = capacity.replicas_needed(planned, effective_s, budget, slots_per_replica=slots,
                                          max_replicas=scaling.max_replicas)
    else:
        # A declared target (or no latency objective): that many calls in flight per replica.
        target = (scaling.target_concurrency if scaling.target_concurrency is not None
                  else slots * capacity.MAX_UTILISATION)
        needed = math.ceil(planned * effective_s / target)
    desired = _bounded(needed, scaling)
    delay = duration_seconds(scaling.scale_down_delay)
    recent = (*((t, n) for t, n in state.desired if t > now - delay), (now, desired))
    state = state.evolve(desired=recent)
    figures = {"forecastRate": round(planned, 3), "rate": round(rate_now, 3),
               "serviceSeconds": round(service_s, 6),
               "capacityPerReplica": round(capacity.sustainable_rate(
                   1, effective_s, budget, slots_per_replica=slots), 3),
               "capacityFactor": round(state.capacity_factor, 3),
               "startupSeconds": round(startup, 1), "periodSeconds": period * series.step,
               "burstRate": round(burst, 3), "needed": needed}

    if desired > current:
        state = state.evolve(last_scaled=now, scale_started=(now, desired))
        return ScalePlan(desired, f"forecast {planned:.1f}/s within {horizon * series.step:.0f}s "
                         f"needs {desired} (now {current})", state, figures)
    # Scale down to the most any recent tick wanted, and only by a worthwhile step.
    held = max(n for _, n in recent)
    if current > scaling.max_replicas:
        return ScalePlan(scaling.max_replicas, "above maxReplicas", state, figures)
    if held < current and current - held >= max(1, math.floor(0.1 * current)) \
            and now - state.last_scaled >= delay and now - state.started >= delay:
        state = state.evolve(last_scaled=now, scale_started=None)
        return ScalePlan(held, f"load {rate_now:.1f}/s needed at most {held} for "
                         f"{scaling.scale_down_delay} (now {current})", state, figures)
    return ScalePlan(None, f"{current} replicas fit a forecast of {planned:.1f}/s", state,
                     figures)


def _bounded(replicas: int, scaling: Scaling) -> int:
    return min(scaling.max_replicas, max(scaling.min_replicas, replicas))


def _learn_service(state: State, series: Series) -> tuple[State, float]:
    """Mean service time, smoothed across ticks (a replica's speed drifts slowly)."""
    observed = series.last("service", back=2)
    if not finite(observed) or observed <= 0:
        return state, state.service_s
    learned = observed if not finite(state.service_s) else 0.7 * state.service_s + 0.3 * observed
    return state.evolve(service_s=learned), learned


def _learn_capacity(state: State, series: Series, spec: CapabilitySpec | ActorSpec,
                    budget: float | None, service_s: float, slots: int, ready: int) -> State:
    """Correct the model with what happened: an SLO miss at a load it deemed safe lowers the
    capacity factor; comfortable running near its limit slowly raises it (the model assumes
    exponential service times, so calmer calls earn up to 20% more)."""
    if budget is None or spec.slo is None or spec.slo.latency_p99_ms is None or ready <= 0:
        return state
    p99, rate = series.last("p99"), series.last("rate")
    if not finite(p99) or not finite(rate) or rate <= 0:
        return state
    objective = spec.slo.latency_p99_ms / 1e3
    effective = service_s / state.capacity_factor
    fits = capacity.slots_needed(rate, effective, budget, max_slots=ready * slots + 1) \
        <= ready * slots
    factor = state.capacity_factor
    if p99 > objective and fits:
        factor *= MISS_FACTOR
    elif p99 < 0.6 * objective and fits and capacity.slots_needed(
            rate * 1.15, effective, budget, max_slots=ready * slots + 1) > ready * slots:
        factor *= COMFORT_FACTOR
    return state.evolve(capacity_factor=min(1.2, max(0.3, factor)))


def _learn_startup(state: State, observed: Observation, now: float) -> State:
    """Pod start-up time: from a scale-up to the tick that saw its replicas ready."""
    if state.scale_started is None:
        return state
    started, wanted = state.scale_started
    if observed.ready_replicas < wanted:
        return state
    took = now - started
    learned = took if not finite(state.startup_s) else 0.7 * state.startup_s + 0.3 * took
    return state.evolve(startup_s=learned, scale_started=None)


def _seasonality(state: State, series: Series, now: float) -> tuple[State, int]:
    """The rate's period in samples, re-detected every few minutes (it is the costly part)."""
    if now - state.period_checked < PERIOD_RECHECK_S:
        return state, state.period_steps
    shortest = max(2, math.ceil(SHORTEST_PERIOD_S / series.step))
    period = forecast.detect_period(series.rate, shortest=shortest,
                                    longest=len(series.rate) // 2)
    return state.evolve(period_steps=period, period_checked=now), period

