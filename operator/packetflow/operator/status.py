"""Pure status logic: a workload's state (or a spec error) -> a Capability's or Actor's ``status``.

A Capability's workload is a Deployment, an Actor's a StatefulSet.

Conditions follow the Kubernetes convention (``metav1.Condition``): ``type``, ``status``
("True"/"False"/"Unknown"), CamelCase ``reason``, ``message``, ``lastTransitionTime`` (kept
while the status does not flip) and ``observedGeneration``.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

READY: Final = "Ready"
DEGRADED: Final = "Degraded"
# The status fields the operator writes (a new one goes here too, so a restarted operator
# carries it on); anything else under status belongs to someone else (the routing
# controller, kopf) and is never sent back.
OWN_KEYS: Final = frozenset({"conditions", "observedGeneration", "replicas", "readyReplicas",
                             "endpoint", "selector", "members", "activeActors", "canary"})


@dataclass(frozen=True)
class Condition:
    """One condition before it is stamped with times and generations."""

    type: str
    status: bool
    reason: str
    message: str


@dataclass(frozen=True)
class Workload:
    """What a capability's Deployment reports: replica counts and two conditions."""

    replicas: int
    ready_replicas: int
    ready: Condition
    degraded: Condition


def now_rfc3339() -> str:
    """The current UTC time as Kubernetes writes timestamps (seconds, ``Z``)."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def warning_event(obj: Mapping[str, Any], reason: str, message: str,
                  now: str) -> dict[str, Any]:
    """A core/v1 ``Warning`` Event about ``obj`` (a Capability or Actor), as kubectl
    describe shows it; the API server names it (generateName)."""
    meta = obj.get("metadata") or {}
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{meta.get('name')}.", "namespace": meta.get("namespace")},
        "involvedObject": {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"),
                           "name": meta.get("name"), "namespace": meta.get("namespace"),
                           "uid": meta.get("uid")},
        "type": "Warning", "reason": reason, "message": message[:1024],
        "source": {"component": "packetflow-operator"}, "reportingComponent": "packetflow-operator",
        "firstTimestamp": now, "lastTimestamp": now, "count": 1,
    }


def _int(value: Any) -> int:
    return value if isinstance(value, int) else 0


def assess_deployment(deployment: Mapping[str, Any]) -> Workload:
    """Readiness of a capability from its Deployment, as the deployment controller reports it."""
    name = deployment.get("metadata", {}).get("name", "?")
    spec = deployment.get("spec", {}) or {}
    status = deployment.get("status", {}) or {}
    # The API server defaults spec.replicas to 1; the emulator and fresh objects may omit it.
    desired = spec.get("replicas", 1)
    desired = desired if isinstance(desired, int) else 1
    replicas = _int(status.get("replicas"))
    ready = _int(status.get("readyReplicas"))
    updated = _int(status.get("updatedReplicas"))
    generation = deployment.get("metadata", {}).get("generation")
    observed = status.get("observedGeneration")

    degraded = Condition(DEGRADED, False, "AsExpected", "")
    for cond in status.get("conditions", []) or []:
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            degraded = Condition(DEGRADED, True, "ProgressDeadlineExceeded",
                                 cond.get("message") or f"Deployment {name} stopped progressing")
        elif cond.get("type") == "ReplicaFailure" and cond.get("status") == "True":
            degraded = Condition(DEGRADED, True, "ReplicaFailure",
                                 cond.get("message") or f"Deployment {name} cannot create pods")

    if isinstance(generation, int) and (not isinstance(observed, int) or observed < generation):
        ready_cond = Condition(READY, False, "Progressing",
                               f"Deployment {name} has not observed generation {generation} yet")
    elif desired == 0:
        ready_cond = Condition(READY, False, "ScaledToZero", f"Deployment {name} has 0 replicas")
    elif ready >= desired and updated >= desired:
        ready_cond = Condition(READY, True, "ReplicasReady",
                               f"{ready}/{desired} replicas ready")
    else:
        ready_cond = Condition(READY, False, "Progressing",
                               f"{ready}/{desired} replicas ready, {updated} updated")
    return Workload(replicas=replicas, ready_replicas=ready, ready=ready_cond, degraded=degraded)


def assess_statefulset(statefulset: Mapping[str, Any]) -> Workload:
    """Readiness of an Actor from its StatefulSet, by the rules of ``kubectl rollout status``.

    Ready: the controller saw the current generation, every replica is ready and no rolling
    update is in progress (update revision == current revision).
    """
    name = statefulset.get("metadata", {}).get("name", "?")
    spec = statefulset.get("spec", {}) or {}
    status = statefulset.get("status", {}) or {}
    desired = spec.get("replicas", 1)
    desired = desired if isinstance(desired, int) else 1
    replicas = _int(status.get("replicas"))
    ready = _int(status.get("readyReplicas"))
    generation = statefulset.get("metadata", {}).get("generation")
    observed = status.get("observedGeneration")
    current, update = status.get("currentRevision"), status.get("updateRevision")
    # StatefulSets report no failure conditions; pods that cannot start show as not ready.
    degraded = Condition(DEGRADED, False, "AsExpected", "")
    if isinstance(generation, int) and (not isinstance(observed, int) or observed < generation):
        ready_cond = Condition(READY, False, "Progressing", f"StatefulSet {name} has not "
                               f"observed generation {generation} yet")
    elif ready < desired:
        ready_cond = Condition(READY, False, "Progressing", f"{ready}/{desired} members ready")
    elif update and current and update != current:
        ready_cond = Condition(READY, False, "Progressing",
                               f"{ready}/{desired} members ready, rolling update in progress")
    else:
        ready_cond = Condition(READY, True, "ReplicasReady", f"{ready}/{desired} members ready")
    return Workload(replicas=replicas, ready_replicas=ready, ready=ready_cond, degraded=degraded)


def stamp_conditions(
    conditions: Sequence[Condition],
    previous: Sequence[Mapping[str, Any]] | None,
    generation: int | None,
    now: str,
) -> list[dict[str, Any]]:
    """Conditions as written to ``status.conditions``; a time changes only when status flips."""
    before = {c.get("type"): c for c in previous or [] if isinstance(c, Mapping)}
    out: list[dict[str, Any]] = []
    for cond in conditions:
        status = "True" if cond.status else "False"
        old = before.get(cond.type)
        since = old.get("lastTransitionTime") if old and old.get("status") == status else None
        stamped: dict[str, Any] = {"type": cond.type, "status": status, "reason": cond.reason,
                                   "message": cond.message, "lastTransitionTime": since or now}
        if generation is not None:
            stamped["observedGeneration"] = generation
        out.append(stamped)
    return out


def workload_status(
    workload: Workload,
    *,
    endpoint: str,
    selector: str,
    previous: Sequence[Mapping[str, Any]] | None,
    generation: int | None,
    now: str,
    members: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The status for a valid spec whose children are applied; ``members`` for Actors."""
    out: dict[str, Any] = {
        "conditions": stamp_conditions([workload.ready, workload.degraded], previous,
                                       generation, now),
        "replicas": workload.replicas,
        "readyReplicas": workload.ready_replicas,
        "endpoint": endpoint,
        "selector": selector,
    }
    if members is not None:
        out["members"] = list(members)
    return out


def failure_status(
    reason: str,
    message: str,
    *,
    previous: Sequence[Mapping[str, Any]] | None,
    generation: int | None,
    now: str,
) -> dict[str, Any]:
    """Status when the spec is invalid or its children cannot be applied (Degraded, not Ready).

    Replica counts and endpoint are left out on purpose: the children (and the last good
    pods) are untouched, so what was reported about them stays true.
    """
    conditions = [Condition(READY, False, reason, message),
                  Condition(DEGRADED, True, reason, message)]
    return {"conditions": stamp_conditions(conditions, previous, generation, now)}


def workload_view(workload: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a Deployment or StatefulSet its assessment reads (name, generation,
    replicas, status): what the operator keeps of each workload between events."""
    meta = workload.get("metadata") or {}
    spec = workload.get("spec") or {}
    view: dict[str, Any] = {"metadata": {"name": meta.get("name"),
                                         "generation": meta.get("generation")},
                            "spec": {}, "status": dict(workload.get("status") or {})}
    if "replicas" in spec:
        view["spec"]["replicas"] = spec["replicas"]
    return view


def own_status(status: Mapping[str, Any] | None) -> dict[str, Any]:
    """Only the fields of a live status the operator writes (:data:`OWN_KEYS`)."""
    return {key: value for key, value in (status or {}).items() if key in OWN_KEYS}


def status_changed(desired: Mapping[str, Any], live: Mapping[str, Any] | None) -> bool:
    """Whether the live status differs from ``desired`` in a field ``desired`` sets (times of
    unchanged conditions aside): only then is a status write worth making."""
    live = live or {}
    return not same_status(desired, {key: live.get(key) for key in desired})


def same_status(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    """Whether two statuses say the same thing, ignoring when conditions last flipped."""
    def essence(status: Mapping[str, Any] | None) -> dict[str, Any]:
        out = dict(status or {})
        out["conditions"] = [{k: v for k, v in c.items() if k != "lastTransitionTime"}
                             for c in out.get("conditions", []) or []]
        return out
    return essence(a) == essence(b)
