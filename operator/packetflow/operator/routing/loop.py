"""The controller's loop: every interval, read each managed resource's metrics, ``decide``,
and hand the decision to a sink: Kubernetes (scale, spec, status, Events) or, in target
mode, stdout (what it would do, as JSON lines).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import ValidationError

from packetflow.operator.client import ApiError
from packetflow.operator.routing.decide import decide
from packetflow.operator.routing.kube import (
    APPROVE,
    REJECT,
    ControllerKube,
    decision_events,
    render_status,
)
from packetflow.operator.routing.model import Decision, Observation, State, Target
from packetflow.operator.routing.prometheus import (
    FAMILIES,
    MetricsUnavailable,
    PrometheusReader,
)
from packetflow.operator.routing.settings import ControllerSettings
from packetflow.operator.routing.slo import ObjectiveMetrics
from packetflow.operator.status import now_rfc3339
from packetflow.spec import ActorSpec, CapabilitySpec

log = logging.getLogger("packetflow.controller")
# Prometheus queries in flight at once (each resource makes about a dozen).
PARALLEL_READS = 8
# Status is written when what it shows changes, else this often: the forecast and the state
# move every tick, which is not worth an API write per resource per tick.
STATUS_REFRESH_S = 60.0


@dataclass(frozen=True)
class Managed:
    """A resource the controller decides for, as read this tick."""

    kind: str
    namespace: str | None
    name: str
    spec: CapabilitySpec | ActorSpec
    replicas: int | None
    ready: int
    approve: str | None = None
    reject: str | None = None
    obj: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str | None, str]:
        """Identity across ticks."""
        return (self.kind, self.namespace, self.name)

    @property
    def label(self) -> str:
        """``Kind/namespace/name`` (no namespace locally)."""
        return "/".join(p for p in (self.kind, self.namespace, self.name) if p)


def wants_control(spec: CapabilitySpec | ActorSpec) -> bool:
    """Resources that declare scaling, an SLO or a canary are the controller's business."""
    return spec.scaling is not None or spec.slo is not None or \
        (isinstance(spec, CapabilitySpec) and spec.canary is not None)


def managed_from_object(obj: Mapping[str, Any]) -> Managed | None:
    """A listed Capability or Actor, or None when its spec is invalid (the operator reports
    that) or asks for nothing the controller does."""
    kind = obj.get("kind", "Capability")
    model = CapabilitySpec if kind == "Capability" else ActorSpec
    try:
        spec = model.model_validate(obj.get("spec") or {})
    except ValidationError:
        return None
    if not wants_control(spec):
        return None
    meta = obj.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    status = obj.get("status") or {}
    ready = status.get("readyReplicas")
    return Managed(kind, meta.get("namespace"), meta["name"], spec, spec.replicas,
                   ready if isinstance(ready, int) else 0, annotations.get(APPROVE),
                   annotations.get(REJECT), obj)


class Sink(Protocol):
    """Where decisions go."""

    async def apply(self, resource: Managed, decision: Decision, before: State,
                    observed: Observation) -> None:
        """Carry the decision out (or report it)."""


class ControllerMetrics:
    """The controller's own metrics: decisions, desired replicas, forecasts, metrics health."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        labels = ["kind", "namespace", "name"]
        self.decisions = Counter("packetflow_controller_decisions",
                                 "Changes the controller applied, by kind of change.",
                                 [*labels, "change"], registry=self.registry)
        self.desired = Gauge("packetflow_controller_desired_replicas",
                             "Replicas the controller last decided.", labels,
                             registry=self.registry)
        self.forecast = Gauge("packetflow_controller_forecast_rate",
                              "Calls/s the controller plans for.", labels,
                              registry=self.registry)
        self.capacity = Gauge("packetflow_controller_capacity_per_replica",
                              "Calls/s one replica sustains within the SLO (learned).",
                              labels, registry=self.registry)
        self.metrics_up = Gauge("packetflow_controller_metrics_available",
                                "1 when Prometheus answered for the resource, else 0.",
                                labels, registry=self.registry)
        self.pending = Gauge("packetflow_controller_pending_recommendations",
                             "Risky recommendations waiting for approval.", labels,
                             registry=self.registry)
        self.objectives = ObjectiveMetrics(self.registry)

    def record(self, resource: Managed, decision: Decision) -> None:
        """Export what one decision says."""
        labels = (resource.kind, resource.namespace or "", resource.name)
        for rec in decision.applied:
            self.decisions.labels(*labels, rec.kind).inc()
        if decision.replicas is not None:
            self.desired.labels(*labels).set(decision.replicas)
        elif resource.replicas is not None:
            self.desired.labels(*labels).set(resource.replicas)
        for name, gauge in (("forecastRate", self.forecast),
                            ("capacityPerReplica", self.capacity)):
            if name in decision.figures:
                gauge.labels(*labels).set(decision.figures[name])
        self.metrics_up.labels(*labels).set(1 if decision.conditions[0].status else 0)
        self.pending.labels(*labels).set(
            sum(1 for r in decision.recommendations if r.phase == "pending"))
        if resource.kind == "Capability":  # the SLO rules join the runtime's series
            self.objectives.set(resource.namespace or "", resource.name, resource.spec.slo)

    def forget(self, key: tuple[str, str | None, str]) -> None:
        """A deleted resource's objectives are withdrawn (its alerts stop)."""
        kind, namespace, name = key
        if kind == "Capability":
            self.objectives.set(namespace or "", name, None)


class RoutingController:
    """Decides every managed resource once per :meth:`tick`."""

    def __init__(self, settings: ControllerSettings, reader: PrometheusReader, sink: Sink,
                 metrics: ControllerMetrics | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.reader = reader
        self.sink = sink
        self.metrics = metrics or ControllerMetrics()
        self.clock = clock
        self.tuning = settings.tuning()
        self.states: dict[tuple[str, str | None, str], State] = {}

    async def tick(self, resources: Sequence[Managed],
                   peers: Mapping[str | None, Mapping[str, CapabilitySpec]]
                   ) -> list[tuple[Managed, Decision]]:
        """One round over ``resources``; ``peers`` are each namespace's capabilities."""
        now = self.clock()
        gate = asyncio.Semaphore(PARALLEL_READS)

        async def one(resource: Managed) -> tuple[Managed, Decision]:
            async with gate:
                observed = await self.observe(resource, now)
            state = self.states.get(resource.key) or _state_from_status(resource.obj)
            target = Target("Actor" if resource.kind == "Actor" else "Capability",
                            resource.name, resource.spec, peers.get(resource.namespace, {}))
            decision = decide(observed, target, state, now, self.tuning)
            self.states[resource.key] = decision.state
            self.metrics.record(resource, decision)
            try:
                await self.sink.apply(resource, decision, state, observed)
            except ApiError as exc:
                log.warning("writing %s failed: %s", resource.label, exc)
            return resource, decision

        results = await asyncio.gather(*(one(r) for r in resources))
        live = {r.key for r in resources}
        for key in [k for k in self.states if k not in live]:
            del self.states[key]  # deleted resources are forgotten
            self.metrics.forget(key)
        return list(results)

    async def observe(self, resource: Managed, now: float) -> Observation:
        """What Prometheus says about ``resource`` (or why it says nothing)."""
        scope = ({self.settings.namespace_label: resource.namespace}
                 if self.settings.namespace_label and resource.namespace else {})
        try:
            readings = await self.reader.read(resource.name, now, scope,
                                              FAMILIES[resource.kind])
        except MetricsUnavailable as exc:
            return Observation(series=None, replicas=resource.replicas,
                               ready_replicas=resource.ready, error=str(exc),
                               approve=resource.approve, reject=resource.reject)
        return Observation(series=readings.series, replicas=resource.replicas,
                           ready_replicas=resource.ready, versions=readings.versions,
                           repeat_ratio=readings.repeat_ratio,
                           rejected_ratio=readings.rejected_ratio,
                           satisfaction=readings.satisfaction,
                           approve=resource.approve, reject=resource.reject)


def _state_from_status(obj: Mapping[str, Any]) -> State:
    """A restarted controller resumes from what it wrote in status."""
    status = obj.get("status") or {}
    routing = status.get("routing") or {}
    return State.from_status(routing.get("state"), status.get("recommendations") or (),
                             status.get("optimizationHistory") or ())


# ------------------------------------------------------------------------------- sinks


class KubernetesSink:
    """Writes decisions: replicas via the scale subresource, the canary weight and approved
    changes as spec merge patches, the controller's status keys, and Events."""

    def __init__(self, kube: ControllerKube, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.kube = kube
        self.clock = clock
        self.written: dict[tuple[str, str | None, str], tuple[str, float]] = {}

    async def apply(self, resource: Managed, decision: Decision, before: State,
                    observed: Observation) -> None:
        """Write what changed, then status (when it shows something new, or a minute
        passed), then Events."""
        assert resource.namespace is not None
        kind, ns, name = resource.kind, resource.namespace, resource.name
        if decision.replicas is not None:
            await self.kube.scale(kind, ns, name, decision.replicas)
        if decision.weight is not None:
            await self.kube.patch_spec(kind, ns, name, {"canary": {"weight": decision.weight}})
        if decision.patch:
            await self.kube.patch_spec(kind, ns, name, decision.patch)
        status = render_status(decision, resource.obj.get("status"), now_rfc3339())
        shown = {**status, "routing": {k: v for k, v in status["routing"].items()
                                       if k not in ("lastDecisionTime", "figures", "state")}}
        digest = json.dumps(shown, sort_keys=True, default=str)
        last = self.written.get(resource.key)
        if last is None or last[0] != digest or self.clock() - last[1] >= STATUS_REFRESH_S:
            await self.kube.patch_status(kind, ns, name, status)
            self.written[resource.key] = (digest, self.clock())
        known = {r.id for r in before.recommendations}
        new_pending = [r for r in decision.recommendations
                       if r.phase == "pending" and r.id not in known]
        routing = (resource.obj.get("status") or {}).get("routing") or {}
        was_up = not any(c.get("type") == "MetricsAvailable" and c.get("status") == "False"
                         for c in routing.get("conditions") or [] if isinstance(c, dict))
        lost = observed.error if observed.series is None and was_up else None
        for event in decision_events(resource.obj, decision, new_pending, lost):
            await self.kube.post_event(event)


class PrintSink:
    """Target mode: one JSON line per decision that changes or says something."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.replicas: dict[tuple[str, str | None, str], int] = {}
        self.said: dict[tuple[str, str | None, str], str] = {}

    async def apply(self, resource: Managed, decision: Decision, before: State,
                    observed: Observation) -> None:
        """Print the decision; remember replicas as if they had been written."""
        if decision.replicas is not None:
            self.replicas[resource.key] = decision.replicas
        pending = [r.to_status() for r in decision.recommendations if r.phase == "pending"]
        line: dict[str, Any] = {
            "resource": resource.label,
            "replicas": ({"from": observed.replicas, "to": decision.replicas}
                         if decision.replicas is not None else None),
            "weight": decision.weight, "patch": decision.patch,
            "reasons": list(decision.reasons),
            "pending": pending,
            "conditions": [{"type": c.type, "status": c.status, "reason": c.reason,
                            "message": c.message} for c in decision.conditions],
            "figures": decision.figures,
        }
        # Say it when something changes or the story does (not every quiet tick).
        story = json.dumps([[r["id"] for r in pending],
                            [(c.type, c.status) for c in decision.conditions]])
        if decision.replicas is None and decision.weight is None and not decision.patch \
                and self.said.get(resource.key) == story:
            return
        self.said[resource.key] = story
        self.stream.write(json.dumps({"time": round(time.time(), 3), **line},
                                     default=str) + "\n")
        self.stream.flush()


# ------------------------------------------------------------------------------- target mode


def approvals_path(state_dir: Path) -> Path:
    """Where ``packetflow approve`` leaves approvals for a target-mode controller."""
    return state_dir / "controller-approvals.json"


def read_approvals(state_dir: Path) -> dict[str, dict[str, str]]:
    """name -> {"approve": id, "reject": id}; a missing or broken file is no approval."""
    try:
        data = json.loads(approvals_path(state_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): {kk: str(vv) for kk, vv in v.items()} for k, v in data.items()
            if isinstance(v, dict)} if isinstance(data, dict) else {}


def write_approval(state_dir: Path, name: str, rec_id: str, *, reject: bool) -> None:
    """Record an approval (or rejection) of ``rec_id`` for resource ``name``."""
    approvals = read_approvals(state_dir)
    approvals.setdefault(name, {})["reject" if reject else "approve"] = rec_id
    state_dir.mkdir(parents=True, exist_ok=True)
    path = approvals_path(state_dir)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(approvals, indent=2), encoding="utf-8")
    partial.replace(path)
