"""The reconcile loop's I/O: apply rendered children, write status. kopf wiring is elsewhere.

One :class:`Reconciler` per operator keeps, per Capability or Actor, what it last applied and
wrote, and a lock: the resource's handler and the events of its children both write its
status, and serialising them per resource means the last write is always made from the
freshest workload (Deployment or StatefulSet) the operator has seen (no stale "not ready"
overwriting a "ready").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import kopf

from packetflow.manifests import ManifestError, parse_manifest
from packetflow.operator import active, render, status
from packetflow.operator.client import (
    ApiError,
    ConflictError,
    KubeClient,
    NotFoundError,
)
from packetflow.operator.crds import ACTOR_NAME_MAX_LENGTH
from packetflow.operator.drift import drift_patch, narrow_spec_patch
from packetflow.operator.metrics import OperatorMetrics
from packetflow.operator.settings import OperatorSettings
from packetflow.spec import API_VERSION, Actor, Capability

logger = logging.getLogger(__name__)

Key = tuple[str, str, str]  # (kind, namespace, name)
Resource = Capability | Actor
OWNER_KINDS = ("Capability", "Actor")
GONE_REMEMBERED = 10_000  # uids of deleted owners kept (see Reconciler.gone)


class ChildConflictError(Exception):
    """A child's name is taken by an object this resource does not control."""

    reason = "ChildConflict"


class ImmutableFieldError(ChildConflictError):
    """The spec changed a child's field that cannot change in place (a person must act)."""

    reason = "ImmutableField"


@dataclass
class ResourceState:
    """What the operator knows about one Capability or Actor between events."""

    kind: str
    uid: str
    owner_reference: dict[str, Any]
    generation: int | None = None
    manifest: Resource | None = None  # None while the spec is invalid
    status: dict[str, Any] | None = None  # the last status written (or read at start)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(frozen=True)
class ReconcileReport:
    """How a reconcile ended: the spec errors (if any) and the children written."""

    errors: list[ManifestError]
    writes: int = 0


def _plain(value: Any) -> Any:
    """kopf's body views -> plain dicts and lists (the models and renderers want plain data)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def describe_errors(errors: list[ManifestError]) -> str:
    """Spec errors as one message, each naming its field: ``spec.requires.a.type: ...``."""
    return "; ".join(f"{e.path}: {e.message}" if e.path else e.message for e in errors)


def validate_resource(body: Mapping[str, Any], source: str) -> Resource | list[ManifestError]:
    """The spec models' verdict on a Capability or Actor body, plus the operator's own limits."""
    parsed = parse_manifest(body, source=source)
    if isinstance(parsed, list):
        return parsed
    if parsed.kind != body.get("kind"):  # pragma: no cover - parse_manifest goes by kind
        return [ManifestError(source, "kind", f"expected {body.get('kind')}")]
    if isinstance(parsed, Actor) and len(parsed.name) > ACTOR_NAME_MAX_LENGTH:
        return [ManifestError(source, "metadata.name", f"at most {ACTOR_NAME_MAX_LENGTH} "
                              "characters for an Actor (its pods and Services add suffixes)")]
    return parsed


def controller_of(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The ownerReference marked ``controller: true``, if any."""
    for ref in obj.get("metadata", {}).get("ownerReferences", []) or []:
        if ref.get("controller"):
            return dict(ref)
    return None


class Reconciler:
    """Applies a resource's rendered children and keeps its status in step with them."""

    def __init__(self, client: KubeClient, settings: OperatorSettings,
                 metrics: OperatorMetrics) -> None:
        self.client = client
        self.settings = settings
        self.metrics = metrics
        self.states: dict[Key, ResourceState] = {}
        self._http: httpx.AsyncClient | None = None  # to member pods' /metrics; made on use
        # uids of deleted resources: a handler still running for one must not bring its
        # children back (they would be orphans pointing at a uid that no longer exists).
        # Only handlers in flight at the deletion care, so the newest few thousand suffice.
        self.gone: OrderedDict[str, None] = OrderedDict()
        # The MCP aggregate bundle is rewritten by one writer at a time; changes arriving
        # meanwhile mark it dirty and the writer goes round again (bursts coalesce).
        self._mcp_lock = asyncio.Lock()
        self._mcp_dirty = False

    def _state(self, body: Mapping[str, Any]) -> ResourceState:
        meta = body["metadata"]
        key = (body["kind"], meta["namespace"], meta["name"])
        state = self.states.get(key)
        if state is None or state.uid != meta["uid"]:
            state = ResourceState(
                kind=body["kind"], uid=meta["uid"],
                owner_reference=dict(kopf.build_owner_reference(body)),  # type: ignore[arg-type]
                status=dict(body.get("status") or {}) or None)
            self.states[key] = state
        return state

    def forget(self, namespace: str, name: str, uid: str | None,
               kind: str = "Capability") -> None:
        """Drop the state of a deleted Capability or Actor."""
        key = (kind, namespace, name)
        state = self.states.get(key)
        if state is not None and (uid is None or state.uid == uid):
            del self.states[key]
            self._remember_gone(state.uid)
        if uid is not None:
            self._remember_gone(uid)

    def _remember_gone(self, uid: str) -> None:
        self.gone[uid] = None
        while len(self.gone) > GONE_REMEMBERED:
            self.gone.popitem(last=False)

    async def reconcile(self, raw_body: Mapping[str, Any]) -> ReconcileReport:
        """Validate the spec, apply every child, write status. Raises on API failures."""
        body = _plain(raw_body)
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        state = self._state(body)
        generation = body["metadata"].get("generation")
        async with state.lock:
            state.generation = generation
            parsed = validate_resource(body, source=f"{namespace}/{name}")
            if isinstance(parsed, list):
                # Invalid: leave the children (and the last good pods) exactly as they are.
                state.manifest = None
                await self._write_status(state, namespace, name, status.failure_status(
                    "InvalidSpec", describe_errors(parsed), previous=self._previous(state),
                    generation=generation, now=status.now_rfc3339()))
                report = ReconcileReport(errors=parsed)
            else:
                state.manifest = parsed
                report = await self._apply_children(state, parsed, namespace, name)
        if state.kind == "Capability":
            await self.refresh_mcp_bundle(namespace)
        return report

    async def _apply_children(self, state: ResourceState, manifest: Resource, namespace: str,
                              name: str) -> ReconcileReport:
        writes = 0
        live: dict[str, Any] = {}
        try:
            for retired in render.retired_canary(manifest, namespace, state.status):
                with contextlib.suppress(NotFoundError):
                    writes += (await self._apply_child(retired, state, create=False))[1]
            for child in render.desired_children(manifest, namespace, self.settings):
                live, wrote = await self._apply_child(child, state)
                writes += wrote
                await self._write_canary_status(state, namespace, name, child, live)
        except (ChildConflictError, ApiError) as exc:
            if isinstance(exc, ChildConflictError) or not exc.retriable:
                reason = exc.reason if isinstance(exc, ChildConflictError) else "ApplyFailed"
                await self._write_status(state, namespace, name, status.failure_status(
                    reason, str(exc), previous=self._previous(state),
                    generation=state.generation, now=status.now_rfc3339()))
            raise
        await self._write_workload_status(state, namespace, name, live)
        return ReconcileReport(errors=[], writes=writes)

    async def refresh_mcp_bundle(self, namespace: str) -> None:
        """Bring ``packetflow-mcp-bundle`` in the aggregate namespace up to every valid
        Capability the operator knows there (no-op elsewhere, or when the aggregate is off)."""
        if namespace != self.settings.mcp_aggregate_namespace:
            return
        self._mcp_dirty = True
        if self._mcp_lock.locked():
            return  # the running writer goes round again and includes this change
        async with self._mcp_lock:
            while self._mcp_dirty:
                self._mcp_dirty = False
                capabilities = [s.manifest for (kind, ns, _), s in list(self.states.items())
                                if kind == "Capability" and ns == namespace
                                and isinstance(s.manifest, Capability)]
                await self._apply_unowned(
                    render.render_mcp_bundle(capabilities, namespace, self.settings))

    async def _apply_unowned(self, desired: dict[str, Any]) -> None:
        """Create or patch an object no single resource owns (the namespace's MCP bundle)."""
        meta = desired["metadata"]
        api_version, kind = desired["apiVersion"], desired["kind"]
        try:
            live = await self.client.get(api_version, kind, meta["namespace"], meta["name"])
        except NotFoundError:
            try:
                await self.client.create(desired)
                self.metrics.child_writes.labels(kind, "create").inc()
                return
            except ConflictError:
                live = await self.client.get(api_version, kind, meta["namespace"],
                                             meta["name"])
        labels = live.get("metadata", {}).get("labels", {}) or {}
        if labels.get(render.LABEL_MANAGED_BY) != render.MANAGED_BY:
            logger.warning("%s %s/%s exists and is not managed by the operator: left alone",
                           kind, meta["namespace"], meta["name"])
            return
        patch = drift_patch(desired, live)
        if patch is not None:
            await self.client.merge_patch(api_version, kind, meta["namespace"], meta["name"],
                                          patch)
            self.metrics.child_writes.labels(kind, "patch").inc()

    async def child_changed(self, event_type: str | None, raw_child: Mapping[str, Any]) -> bool:
        """React to an event of a child: recreate it, undo an edit, report readiness.

        Returns whether the child was written. Children of unknown or invalid resources are
        left alone (the owner's own handler covers them once it runs).
        """
        child = _plain(raw_child)
        owner = controller_of(child)
        if owner is None or owner.get("kind") not in OWNER_KINDS \
                or owner.get("apiVersion") != API_VERSION:
            return False
        namespace = child["metadata"].get("namespace")
        state = self.states.get((str(owner["kind"]), namespace, owner.get("name", "")))
        if state is None or state.uid != owner.get("uid") or state.manifest is None:
            return False
        async with state.lock:
            manifest = state.manifest
            if manifest is None:
                return False
            desired = next((c for c in render.desired_children(manifest, namespace,
                                                                  self.settings)
                            if c["kind"] == child.get("kind")
                            and c["metadata"]["name"] == child["metadata"].get("name")), None)
            if desired is None:
                return False
            wrote = False
            live = child
            if event_type == "DELETED":
                # Re-read the owner: when it is being deleted, the child went with it on purpose.
                try:
                    owner_body = await self.client.get(API_VERSION, state.kind, namespace,
                                                       manifest.name)
                except NotFoundError:
                    self.forget(namespace, manifest.name, state.uid, state.kind)
                    return False
                meta = owner_body.get("metadata", {})
                if meta.get("uid") != state.uid or meta.get("deletionTimestamp"):
                    return False
                live, wrote = await self._apply_child(desired, state)
            elif drift_patch(desired, child) is not None:
                # Only patch: if the child is gone, its DELETED event (with the owner check)
                # decides whether it comes back, not this possibly stale event.
                try:
                    live, wrote = await self._apply_child(desired, state, create=False)
                except NotFoundError:
                    return False
            await self._write_canary_status(state, namespace, manifest.name, desired, live)
            if desired["kind"] == render.WORKLOAD_KINDS[state.kind] \
                    and desired["metadata"]["name"] == manifest.name:  # not the canary's
                await self._write_workload_status(state, namespace, manifest.name, live)
            return wrote

    def _previous(self, state: ResourceState) -> list[Mapping[str, Any]] | None:
        conditions = (state.status or {}).get("conditions")
        return conditions if isinstance(conditions, list) else None

    async def _apply_child(self, desired: dict[str, Any], state: ResourceState, *,
                           create: bool = True) -> tuple[dict[str, Any], bool]:
        """Create the child or patch it back to ``desired``; never create it twice."""
        desired = {**desired, "metadata": {**desired["metadata"],
                                           "ownerReferences": [state.owner_reference]}}
        api_version, kind = desired["apiVersion"], desired["kind"]
        meta = desired["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        try:
            live = await self.client.get(api_version, kind, namespace, name)
        except NotFoundError:
            if not create or state.uid in self.gone:
                raise
            try:
                created = await self.client.create(desired)
            except ConflictError:
                # Created meanwhile (another event, or the previous operator instance's write
                # landing late): read it and carry on as an update.
                live = await self.client.get(api_version, kind, namespace, name)
            else:
                self.metrics.child_writes.labels(kind, "create").inc()
                return created, True
        refs = list(live.get("metadata", {}).get("ownerReferences", []) or [])
        controller = controller_of(live)
        patch = drift_patch({k: v for k, v in desired.items()
                             if k != "metadata"} | {"metadata": {
                                 k: v for k, v in meta.items() if k != "ownerReferences"}}, live)
        patch, immutable = narrow_spec_patch(kind, desired, live, patch)
        if controller is None:
            # An orphan (e.g. left by a deletion with propagationPolicy=Orphan) is adopted only
            # when it is ours by its labels; anything else with this name belongs to someone.
            labels = live.get("metadata", {}).get("labels", {}) or {}
            if labels.get(render.LABEL_MANAGED_BY) != render.MANAGED_BY \
                    or labels.get(render.OWNER_LABELS[state.kind]) \
                    != state.owner_reference["name"]:
                raise ChildConflictError(
                    f"{kind} {name} exists and is not managed by this {state.kind}")
            patch = patch or {}
            patch.setdefault("metadata", {})["ownerReferences"] = [*refs, state.owner_reference]
        elif controller.get("uid") != state.uid:
            raise ChildConflictError(
                f"{kind} {name} is controlled by {controller.get('kind')} "
                f"{controller.get('name')} (uid {controller.get('uid')}), not this {state.kind}")
        if immutable:
            raise ImmutableFieldError(
                f"{kind} {name}: {', '.join(immutable)} cannot change in place; delete it with "
                f"`kubectl delete {kind.lower()} {name} --cascade=orphan` (pods and volumes "
                "stay) and the operator recreates it")
        if patch is None:
            return live, False
        patched = await self.client.merge_patch(api_version, kind, namespace, name, patch)
        self.metrics.child_writes.labels(kind, "patch").inc()
        return patched, True

    async def _write_canary_status(self, state: ResourceState, namespace: str, name: str,
                                   child: dict[str, Any], live: Mapping[str, Any]) -> None:
        """``status.canary`` when ``child`` is the canary's workload (see render)."""
        patch = render.canary_status(state.manifest, child, live, state.status)
        if patch is not None:
            await self._write_status(state, namespace, name, patch)

    async def _write_workload_status(self, state: ResourceState, namespace: str, name: str,
                                     workload_object: Mapping[str, Any]) -> None:
        members: list[str] | None = None
        if state.kind == "Actor":
            workload = status.assess_statefulset(workload_object)
            replicas = (workload_object.get("spec") or {}).get("replicas", 1)
            members = render.member_names(name, replicas if isinstance(replicas, int) else 1)
        else:
            workload = status.assess_deployment(workload_object)
        new = status.workload_status(
            workload, endpoint=render.endpoint(name, namespace, self.settings),
            selector=render.label_selector(name, state.kind), previous=self._previous(state),
            generation=state.generation, now=status.now_rfc3339(), members=members)
        await self._write_status(state, namespace, name, new)

    async def refresh_active_actors(self, namespace: str, name: str) -> int | None:
        """Count an Actor's active actors on its members and write ``status.activeActors``
        (left as it was when a member cannot be asked)."""
        state = self.states.get(("Actor", namespace, name))
        if state is None or not isinstance(state.manifest, Actor):
            return None
        urls = active.member_metrics_urls(name, namespace, state.manifest.spec.replicas,
                                          self.settings)
        if self._http is None:
            self._http = httpx.AsyncClient()
        count = await active.count_active(self._http, urls, name)
        if count is not None:
            async with state.lock:
                await self._write_status(state, namespace, name, {"activeActors": count})
        return count

    async def aclose(self) -> None:
        """Close the HTTP client used to read member pods' metrics."""
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def _write_status(self, state: ResourceState, namespace: str, name: str,
                            new: dict[str, Any]) -> None:
        if state.generation is not None:
            new = {**new, "observedGeneration": state.generation}
        merged = {**(state.status or {}), **new}
        if state.status is not None and status.same_status(merged, state.status):
            return  # nothing new to say: no write, no event, no watch traffic
        await self.client.merge_patch(API_VERSION, state.kind, namespace, name,
                                      {"status": new}, subresource="status")
        state.status = merged
