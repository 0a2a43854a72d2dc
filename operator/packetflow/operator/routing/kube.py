"""The controller's Kubernetes side: list resources, write replicas through the scale
subresource, spec changes as merge patches, status through the status subresource, and
Events. Pure renderers (``render_status``, ``render_event``) beside thin I/O.
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Final

import kopf

from packetflow.operator.client import KubeClient
from packetflow.operator.routing.model import Decision, Recommendation
from packetflow.operator.status import stamp_conditions
from packetflow.spec import API_VERSION

APPROVE: Final = "packetflow.io/approve"
REJECT: Final = "packetflow.io/reject"
PLURAL: Final = {"Capability": "capabilities", "Actor": "actors"}
COMPONENT: Final = "packetflow-routing-controller"
# Event reasons by kind of applied change (kubectl describe shows them).
EVENT_REASONS: Final = {
    "replicas": "Scaled", "weights": "CanaryWeight", "canary-rollback": "CanaryRolledBack",
    "canary-promotion": "CanaryPromoted", "concurrency": "ConcurrencyChanged",
    "resources": "ResourcesChanged", "cache": "CacheEnabled",
    "parallel-steps": "StepsParallelized",
}


def render_status(decision: Decision, previous: Mapping[str, Any] | None,
                  now: str) -> dict[str, Any]:
    """The status keys the controller owns: ``recommendations``, ``optimizationHistory``
    and ``routing`` (its conditions, figures, last reasons and state). The operator's own
    keys (``conditions``, ``replicas``...) are left alone."""
    routing_before = (previous or {}).get("routing") or {}
    return {
        "recommendations": [r.to_status() for r in decision.recommendations],
        "optimizationHistory": [e.to_status() for e in decision.state.history],
        "routing": {
            "conditions": stamp_conditions(decision.conditions,
                                           routing_before.get("conditions"), None, now),
            "lastDecisionTime": now,
            "reasons": list(decision.reasons) or routing_before.get("reasons", []),
            "figures": decision.figures,
            "state": decision.state.to_status(),
        },
    }


def render_event(obj: Mapping[str, Any], reason: str, message: str, *,
                 warning: bool = False, now: datetime.datetime | None = None
                 ) -> dict[str, Any]:
    """A core/v1 Event about ``obj`` (what ``kubectl describe`` lists)."""
    meta = obj["metadata"]
    stamp = (now or datetime.datetime.now(datetime.UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}",
                     "namespace": meta["namespace"]},
        "involvedObject": {"apiVersion": obj.get("apiVersion", API_VERSION),
                           "kind": obj["kind"], "name": meta["name"],
                           "namespace": meta["namespace"], "uid": meta.get("uid"),
                           "resourceVersion": meta.get("resourceVersion")},
        "reason": reason, "message": message[:1024],
        "type": "Warning" if warning else "Normal",
        "source": {"component": COMPONENT}, "reportingComponent": COMPONENT,
        "reportingInstance": COMPONENT,
        "firstTimestamp": stamp, "lastTimestamp": stamp, "eventTime": stamp,
        "action": reason, "count": 1,
    }


def decision_events(obj: Mapping[str, Any], decision: Decision,
                    new_pending: Sequence[Recommendation], metrics_lost: str | None
                    ) -> list[dict[str, Any]]:
    """One Event per applied change, per new recommendation waiting for approval, and one
    warning when metrics went missing."""
    events = [render_event(obj, EVENT_REASONS.get(rec.kind, "Applied"),
                           f"{rec.id}: {rec.expected_effect} ({rec.reason})")
              for rec in decision.applied]
    events += [render_event(obj, "Recommended",
                            f"{rec.id} ({rec.risk}): {rec.expected_effect} ({rec.reason}); "
                            f"approve with packetflow.io/approve={rec.id}")
               for rec in new_pending]
    if metrics_lost is not None:
        events.append(render_event(obj, "MetricsUnavailable",
                                   f"no scaling decision: {metrics_lost}", warning=True))
    events += [render_event(obj, "Ignored", note, warning=True) for note in decision.reasons
               if "names no pending recommendation" in note]
    return events


class ControllerKube(KubeClient):
    """The operator's REST client plus what the controller needs: lists and Events."""

    def login(self) -> None:
        """In-cluster service account first, else the kubeconfig (again on expiry)."""
        settings = kopf.OperatorSettings()
        info = (kopf.login_with_service_account(settings=settings)
                or kopf.login_with_kubeconfig(settings=settings))
        if info is None:
            raise kopf.LoginError("no in-cluster service account and no kubeconfig "
                                  "($KUBECONFIG)")
        self.configure(info)

    async def list_resources(self, kind: str, namespace: str | None) -> list[dict[str, Any]]:
        """Every Capability or Actor of ``namespace`` (None: of every namespace)."""
        root = f"/apis/{API_VERSION}"
        path = (f"{root}/namespaces/{namespace}/{PLURAL[kind]}" if namespace
                else f"{root}/{PLURAL[kind]}")
        body = await self._request("GET", path)
        items = body.get("items") or []
        for item in items:  # list items carry no kind of their own
            item.setdefault("apiVersion", API_VERSION)
            item.setdefault("kind", kind)
        return [item for item in items if isinstance(item, dict)]

    async def scale(self, kind: str, namespace: str, name: str, replicas: int) -> None:
        """Set the replica count through the scale subresource (as an HPA does)."""
        await self.merge_patch(API_VERSION, kind, namespace, name,
                               {"spec": {"replicas": replicas}}, subresource="scale")

    async def patch_spec(self, kind: str, namespace: str, name: str,
                         patch: Mapping[str, Any]) -> None:
        """Merge-patch the spec (canary weight, approved changes)."""
        await self.merge_patch(API_VERSION, kind, namespace, name, {"spec": patch})

    async def patch_status(self, kind: str, namespace: str, name: str,
                           status: Mapping[str, Any]) -> None:
        """Merge-patch the controller's status keys through the status subresource."""
        await self.merge_patch(API_VERSION, kind, namespace, name, {"status": status},
                               subresource="status")

    async def post_event(self, event: Mapping[str, Any]) -> None:
        """Create a core/v1 Event."""
        await self._request("POST", f"/api/v1/namespaces/{event['metadata']['namespace']}"
                                    "/events", body=event)
