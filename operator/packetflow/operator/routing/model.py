"""Plain data of the routing controller: what it observes, remembers and decides.

Everything here is frozen or JSON-shaped so :func:`~.decide.decide` stays a pure function,
the state round-trips through ``status.routing`` (a restarted controller resumes), and the
benchmark feeds the same types from its simulation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal

from packetflow.operator.status import Condition
from packetflow.spec import ActorSpec, CapabilitySpec

NAN: Final = float("nan")
Risk = Literal["safe", "risky"]
# What became of a recommendation: applied by the controller, waiting for approval, approved
# (applied on the next tick), rejected by annotation, or dropped because it no longer holds.
Phase = Literal["applied", "pending", "rejected", "superseded"]

KINDS: Final = ("replicas", "weights", "canary-rollback", "canary-promotion", "concurrency",
                "resources", "cache", "parallel-steps")


def finite(value: float) -> bool:
    """Whether a metric value is a number (NaN and infinities mean "no data")."""
    return not (math.isnan(value) or math.isinf(value))


@dataclass(frozen=True)
class Series:
    """A capability's metrics as Prometheus shows them: one sample every ``step`` seconds,
    oldest first, the newest taken at ``end``. NaN marks a sample with no data.

    ``rate`` counts calls arriving (the gateway's requests when it exports them, else the
    runtime's calls of every code); ``pending`` is what waits in front of the replicas (only
    a gateway knows; NaN otherwise). ``p99`` is end to end when the gateway reports it.
    """

    step: float
    end: float
    rate: tuple[float, ...]
    errors: tuple[float, ...] = ()
    p99: tuple[float, ...] = ()
    service: tuple[float, ...] = ()
    service_p99: tuple[float, ...] = ()
    in_flight: tuple[float, ...] = ()
    pending: tuple[float, ...] = ()

    def last(self, name: str, back: int = 0) -> float:
        """The newest finite value of the named series within the last ``back + 1`` samples."""
        values: tuple[float, ...] = getattr(self, name)
        for value in reversed(values[len(values) - back - 1:] if back else values[-1:]):
            if finite(value):
                return value
        return NAN

    def window(self, name: str, seconds: float, *, ending: float | None = None) -> list[float]:
        """Finite values of the named series within ``seconds`` before ``ending`` (default
        ``end``)."""
        values: tuple[float, ...] = getattr(self, name)
        stop = self.end if ending is None else ending
        out = []
        for index, value in enumerate(values):
            at = self.end - (len(values) - 1 - index) * self.step
            if stop - seconds < at <= stop and finite(value):
                out.append(value)
        return out


@dataclass(frozen=True)
class VersionStats:
    """One version's recent behaviour (stable or canary), over the controller's window."""

    rate: float
    error_ratio: float
    p99: float

    def breaches(self, latency_s: float | None, availability: float | None) -> list[str]:
        """Which objectives this version misses, as short phrases."""
        missed = []
        if latency_s is not None and finite(self.p99) and self.p99 > latency_s:
            missed.append(f"p99 {self.p99 * 1e3:.0f} ms > {latency_s * 1e3:.0f} ms")
        if availability is not None and finite(self.error_ratio) \
                and self.error_ratio > 1 - availability / 100:
            missed.append(f"errors {self.error_ratio:.2%} > {1 - availability / 100:.2%}")
        return missed


@dataclass(frozen=True)
class Observation:
    """What the controller sees of one resource when it decides.

    ``series`` is None when metrics could not be read; ``error`` then says why, and nothing
    is scaled. ``replicas`` is the count written in the spec (None when unset).
    """

    series: Series | None
    replicas: int | None
    ready_replicas: int
    error: str | None = None
    versions: Mapping[str, VersionStats] = field(default_factory=dict)
    # Share of calls whose input repeated one seen recently (effects: [] only): caching's signal.
    repeat_ratio: float = NAN
    # Share of calls refused at the concurrency limit (RESOURCE_EXHAUSTED).
    rejected_ratio: float = NAN
    # Mean user-satisfaction score (0..1) of recent feedback, NaN when there is none.
    satisfaction: float = NAN
    approve: str | None = None
    reject: str | None = None


@dataclass(frozen=True)
class Target:
    """The resource being controlled and its neighbours (for composition analysis)."""

    kind: Literal["Capability", "Actor"]
    name: str
    spec: CapabilitySpec | ActorSpec
    # Capabilities of the same namespace by name: which effects a composition's steps declare.
    peers: Mapping[str, CapabilitySpec] = field(default_factory=dict)


@dataclass(frozen=True)
class Tuning:
    """How the controller runs: its tick, what it assumes before it has learned, its windows."""

    interval_s: float = 15.0
    startup_s: float = 30.0          # pod start-up until learned from ready replicas
    effect_window_s: float = 600.0   # before/after windows of the feedback loop
    cooloff_s: float = 3600.0        # a kind that did not help is not proposed for this long
    history_limit: int = 20          # status.optimizationHistory entries kept
    canary_soak_s: float = 600.0     # a canary must be healthy this long before promotion
    min_canary_calls: float = 100.0  # calls a canary needs in the window to be judged


@dataclass(frozen=True)
class Recommendation:
    """A proposed change: ``change`` is a JSON merge patch of the spec (or replicas/weight)."""

    id: str
    kind: str
    change: dict[str, Any]
    reason: str
    expected_effect: str
    risk: Risk
    phase: Phase
    since: float

    def to_status(self) -> dict[str, Any]:
        """The ``status.recommendations`` entry."""
        return {"id": self.id, "kind": self.kind, "change": self.change, "reason": self.reason,
                "expectedEffect": self.expected_effect, "risk": self.risk,
                "phase": self.phase, "since": self.since}

    @classmethod
    def from_status(cls, data: Mapping[str, Any]) -> Recommendation:
        """Read an entry written by :meth:`to_status`."""
        return cls(str(data["id"]), str(data["kind"]), dict(data.get("change") or {}),
                   str(data.get("reason", "")), str(data.get("expectedEffect", "")),
                   "risky" if data.get("risk") == "risky" else "safe",
                   data.get("phase", "pending"), float(data.get("since", 0.0)))


@dataclass(frozen=True)
class Effect:
    """One applied change and what it did: metrics in a window before and one after."""

    id: str
    kind: str
    applied_at: float
    before: dict[str, float]
    after: dict[str, float] | None = None
    verdict: Literal["pending", "helped", "no-effect", "hurt"] = "pending"

    def to_status(self) -> dict[str, Any]:
        """The ``status.optimizationHistory`` entry."""
        out: dict[str, Any] = {"id": self.id, "kind": self.kind, "appliedAt": self.applied_at,
                               "before": _finite_only(self.before), "verdict": self.verdict}
        if self.after is not None:
            out["after"] = _finite_only(self.after)
        return out

    @classmethod
    def from_status(cls, data: Mapping[str, Any]) -> Effect:
        """Read an entry written by :meth:`to_status`."""
        after = data.get("after")
        return cls(str(data["id"]), str(data["kind"]), float(data["appliedAt"]),
                   {k: float(v) for k, v in (data.get("before") or {}).items()},
                   None if after is None else {k: float(v) for k, v in after.items()},
                   data.get("verdict", "pending"))


def _finite_only(values: Mapping[str, float]) -> dict[str, float]:
    return {k: round(v, 6) for k, v in values.items() if finite(v)}


@dataclass(frozen=True)
class State:
    """What the controller remembers between ticks (kept in ``status.routing.state``)."""

    started: float = NAN              # the first tick (nothing is scaled down before a delay)
    service_s: float = NAN            # learned mean time a call runs
    capacity_factor: float = 1.0      # learned correction of the queueing model (0.3..1.2)
    startup_s: float = NAN            # learned pod start-up time
    scale_started: tuple[float, int] | None = None  # (when, to how many) awaiting readiness
    ready_seen: tuple[tuple[float, int], ...] = ()  # recent (time, ready replicas)
    desired: tuple[tuple[float, int], ...] = ()      # recent (time, desired replicas)
    last_scaled: float = -math.inf
    period_steps: int = 0             # detected seasonality, in samples (0: none)
    period_checked: float = -math.inf
    canary_healthy_since: float | None = None
    recommendations: tuple[Recommendation, ...] = ()
    history: tuple[Effect, ...] = ()
    cooloff: Mapping[str, float] = field(default_factory=dict)
    kind_score: Mapping[str, float] = field(default_factory=dict)
    sequence: int = 0
    annotations_seen: tuple[str | None, str | None] = (None, None)  # approve, reject

    def evolve(self, **changes: Any) -> State:
        """A copy with ``changes``."""
        return replace(self, **changes)

    def to_status(self) -> dict[str, Any]:
        """JSON for ``status.routing.state`` (recommendations and history live beside it)."""
        return {
            "started": self.started if finite(self.started) else None,
            "serviceSeconds": self.service_s if finite(self.service_s) else None,
            "capacityFactor": self.capacity_factor,
            "startupSeconds": self.startup_s if finite(self.startup_s) else None,
            "scaleStarted": list(self.scale_started) if self.scale_started else None,
            "readySeen": [list(item) for item in self.ready_seen],
            "desired": [list(item) for item in self.desired],
            "lastScaled": self.last_scaled if finite(self.last_scaled) else None,
            "periodSteps": self.period_steps,
            "periodChecked": self.period_checked if finite(self.period_checked) else None,
            "canaryHealthySince": self.canary_healthy_since,
            "cooloff": dict(self.cooloff),
            "kindScore": dict(self.kind_score),
            "sequence": self.sequence,
            "annotationsSeen": list(self.annotations_seen),
        }

    @classmethod
    def from_status(cls, data: Mapping[str, Any] | None,
                    recommendations: Sequence[Mapping[str, Any]] = (),
                    history: Sequence[Mapping[str, Any]] = ()) -> State:
        """Rebuild the state from what :meth:`to_status` wrote; anything unreadable starts
        fresh (a hand-edited status must not stop the controller)."""
        data = data or {}

        def number(key: str, default: float) -> float:
            value = data.get(key)
            return float(value) if isinstance(value, int | float) else default

        started = data.get("scaleStarted")
        try:
            return cls(
                started=number("started", NAN),
                service_s=number("serviceSeconds", NAN),
                capacity_factor=min(1.2, max(0.3, number("capacityFactor", 1.0))),
                startup_s=number("startupSeconds", NAN),
                scale_started=(float(started[0]), int(started[1])) if started else None,
                ready_seen=tuple((float(t), int(n)) for t, n in data.get("readySeen") or ()),
                desired=tuple((float(t), int(n)) for t, n in data.get("desired") or ()),
                last_scaled=number("lastScaled", -math.inf),
                period_steps=int(number("periodSteps", 0)),
                period_checked=number("periodChecked", -math.inf),
                canary_healthy_since=(float(data["canaryHealthySince"])
                                      if data.get("canaryHealthySince") is not None else None),
                recommendations=tuple(Recommendation.from_status(r) for r in recommendations),
                history=tuple(Effect.from_status(e) for e in history),
                cooloff={str(k): float(v) for k, v in (data.get("cooloff") or {}).items()},
                kind_score={str(k): float(v) for k, v in (data.get("kindScore") or {}).items()},
                sequence=int(number("sequence", 0)),
                annotations_seen=_pair(data.get("annotationsSeen")),
            )
        except (TypeError, ValueError, KeyError, IndexError):
            return cls()


def _pair(value: Any) -> tuple[str | None, str | None]:
    if isinstance(value, list) and len(value) == 2:
        return (None if value[0] is None else str(value[0]),
                None if value[1] is None else str(value[1]))
    return (None, None)


@dataclass(frozen=True)
class Decision:
    """What one tick decided. ``replicas``/``weight`` None: leave them as they are."""

    replicas: int | None
    weight: int | None
    patch: dict[str, Any] | None       # a spec merge patch approved or safe to apply now
    recommendations: tuple[Recommendation, ...]
    applied: tuple[Recommendation, ...]  # what this tick changes (each becomes an Event)
    reasons: tuple[str, ...]
    conditions: tuple[Condition, ...]
    state: State
    figures: dict[str, float] = field(default_factory=dict)  # forecast, capacity: for status
