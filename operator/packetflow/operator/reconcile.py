"""The reconcile loop's I/O: apply rendered children, keep status in step. kopf wiring is elsewhere.

The work stays proportional to what changed, not to how many events arrive:

* A spec is parsed and validated once per generation, and its children rendered once then,
  each with a digest (:func:`render.spec_hash`).
* Per child the operator remembers the resourceVersion it last wrote or verified and the digest
  it was verified against. A child event carrying that version is the operator's own write (or
  one already checked) and costs nothing; any other version is compared with the rendered child
  in memory, and only a real difference, a deletion or a readiness change queues the owner.
* Child events queue at most one reconcile per owner (:meth:`Reconciler.enqueue`): one pending,
  plus one more if something arrives while it runs, however many events there are.
* Creating a child is one POST; ``409 AlreadyExists`` is read back and handled as an update.
  A child is read (GET) only when the operator has no verified version of it and did not list
  it: a restart takes the children from the list made before the owners were watched
  (:attr:`Reconciler.listed_children`).
* Status is written only when it says something new. Its ``observedGeneration`` is the
  generation the operator finished handling, which is also kopf's record of it (handlers.py):
  handling a new Capability costs one write per child and one status write, nothing more.
* While other owners' children are being written, a status write waits its turn (bounded:
  ``status_wait_seconds``, pacing.py): in a burst the children come first.

One lock per Capability or Actor serialises everything that writes its children or status, so
the last status written is always computed from the freshest workload the operator has seen.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import httpx
import kopf

from packetflow.manifests import ManifestError, parse_manifest
from packetflow.operator import active, render, status
from packetflow.operator.authority import Authority, AuthorityError, workload_leaf
from packetflow.operator.client import ApiError, ConflictError, KubeClient, NotFoundError
from packetflow.operator.crds import ACTOR_NAME_MAX_LENGTH
from packetflow.operator.drift import drift_patch, narrow_spec_patch
from packetflow.operator.metrics import OperatorMetrics
from packetflow.operator.pacing import ChildrenFirst
from packetflow.operator.settings import OperatorSettings
from packetflow.spec import API_VERSION, Actor, Capability

logger = logging.getLogger(__name__)

Key = tuple[str, str, str]  # (kind, namespace, name) of a Capability or Actor
ChildKey = tuple[str, str]  # (kind, name) of a child
Manifest = dict[str, Any]
Resource = Capability | Actor
OWNER_KINDS: Final = ("Capability", "Actor")
GONE_REMEMBERED: Final = 10_000  # uids of deleted owners kept (see Reconciler.gone)
# The label every child carries; the watches and the resync's lists select by it.
MANAGED_SELECTOR: Final = f"{render.LABEL_MANAGED_BY}={render.MANAGED_BY}"
_WORKLOAD_KINDS: Final = frozenset(render.WORKLOAD_KINDS.values())


class ChildConflictError(Exception):
    """A child's name is taken by an object this resource does not control."""

    reason = "ChildConflict"


class ImmutableFieldError(ChildConflictError):
    """The spec changed a child's field that cannot change in place (a person must act)."""

    reason = "ImmutableField"


@dataclass(frozen=True)
class DesiredChild:
    """A rendered child (without ownerReferences) and the digest of what was rendered."""

    manifest: Manifest
    digest: str


@dataclass
class ChildRecord:
    """What the operator last knew of one child."""

    uid: str | None
    version: str | None  # resourceVersion verified to hold `digest`; None: must be looked at
    digest: str
    deleted: bool = False


@dataclass
class ResourceState:
    """What the operator knows about one Capability or Actor between events."""

    kind: str
    namespace: str
    name: str
    uid: str
    owner_reference: dict[str, Any]
    generation: int | None = None  # of the spec parsed below
    parsed: bool = False
    manifest: Resource | None = None  # None while the spec is invalid
    errors: list[ManifestError] = field(default_factory=list)
    desired: dict[ChildKey, DesiredChild] = field(default_factory=dict)  # in apply order
    children: dict[ChildKey, ChildRecord] = field(default_factory=dict)
    workloads: dict[ChildKey, Manifest] = field(default_factory=dict)  # status.workload_view
    # What the operator wants status to say (only its own fields), and what the API server
    # last said it says (all fields; only the operator's are compared).
    status: dict[str, Any] = field(default_factory=dict)
    live_status: dict[str, Any] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    queued: str | None = None  # trigger of the pending reconcile, when one is queued
    # Children are being applied, or the status write after them waits its turn: that write
    # will include whatever readiness their events bring meanwhile, so those events need no
    # reconcile of their own.
    applying: bool = False

    @property
    def key(self) -> Key:
        """(kind, namespace, name)."""
        return (self.kind, self.namespace, self.name)

    @property
    def workload_key(self) -> ChildKey:
        """The child whose readiness is the resource's: its Deployment or StatefulSet."""
        return (render.WORKLOAD_KINDS[self.kind], self.name)


@dataclass(frozen=True)
class ReconcileReport:
    """How a reconcile ended: the spec errors (if any), the children written, and whether
    the status was written (it said something new)."""

    errors: list[ManifestError]
    writes: int = 0
    status_written: bool = False


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


def apply_phases(desired: Mapping[ChildKey, Any]) -> list[list[ChildKey]]:
    """The children in the order they are applied: first everything a workload's pods
    need (ConfigMap, Service, ServiceAccount, Certificate, NetworkPolicy) at once, then the
    workloads (Deployments, canary included, and StatefulSets) at once."""
    first = [key for key in desired if key[0] not in _WORKLOAD_KINDS]
    return [phase for phase in (first, [key for key in desired if key[0] in _WORKLOAD_KINDS])
            if phase]


def controller_of(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The ownerReference marked ``controller: true``, if any."""
    for ref in obj.get("metadata", {}).get("ownerReferences", []) or []:
        if ref.get("controller"):
            return dict(ref)
    return None


def child_patch(desired: Mapping[str, Any], live: Mapping[str, Any], owner_kind: str,
                owner_reference: Mapping[str, Any]) -> dict[str, Any] | None:
    """The merge patch bringing a live child back to ``desired`` (rendered, without
    ownerReferences), or None when it is in sync; raises when the child is not this owner's.

    An orphan (e.g. left by a deletion with propagationPolicy=Orphan) is adopted only when it
    is ours by its labels; anything else with this name belongs to someone else.
    """
    kind, name = desired["kind"], desired["metadata"]["name"]
    patch, immutable = narrow_spec_patch(kind, desired, live, drift_patch(desired, live))
    controller = controller_of(live)
    if controller is None:
        labels = live.get("metadata", {}).get("labels", {}) or {}
        if labels.get(render.LABEL_MANAGED_BY) != render.MANAGED_BY \
                or labels.get(render.OWNER_LABELS[owner_kind]) != owner_reference["name"]:
            raise ChildConflictError(f"{kind} {name} exists and is not managed by this "
                                     f"{owner_kind}")
        refs = list(live.get("metadata", {}).get("ownerReferences", []) or [])
        patch = patch or {}
        patch.setdefault("metadata", {})["ownerReferences"] = [*refs, dict(owner_reference)]
    elif controller.get("uid") != owner_reference["uid"]:
        raise ChildConflictError(
            f"{kind} {name} is controlled by {controller.get('kind')} {controller.get('name')} "
            f"(uid {controller.get('uid')}), not this {owner_kind}")
    if immutable:
        raise ImmutableFieldError(
            f"{kind} {name}: {', '.join(immutable)} cannot change in place; delete it with "
            f"`kubectl delete {kind.lower()} {name} --cascade=orphan` (pods and volumes stay) "
            "and the operator recreates it")
    return patch


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
        self._tasks: set[asyncio.Task[None]] = set()  # queued reconciles, kept referenced
        self._retries: set[asyncio.TimerHandle] = set()
        # Children listed before their owner was known (at start: see handlers.startup), by
        # (owner uid, kind, name): a resume takes its children from here instead of reading
        # them. What no owner claims is dropped at the next resync.
        self.listed_children: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.children_first = ChildrenFirst(settings.status_wait_seconds)
        # The MCP aggregate bundle is rewritten by one writer at a time; changes arriving
        # meanwhile mark it dirty and the writer goes round again (bursts coalesce).
        self._mcp_lock = asyncio.Lock()
        self._mcp_dirty = False
        self._mcp_written: dict[str, str] = {}  # namespace -> digest of the bundle written
        # mtls_issuer 'operator': the cluster authority, which writes workload Secrets.
        self.authority = Authority(client, settings, metrics) \
            if render.operator_issued(settings) else None

    # --- state -------------------------------------------------------------------------------

    def _state(self, body: Mapping[str, Any]) -> ResourceState:
        meta = body["metadata"]
        key = (body["kind"], meta["namespace"], meta["name"])
        state = self.states.get(key)
        if state is None or state.uid != meta["uid"]:
            live = dict(body.get("status") or {})
            state = ResourceState(
                kind=body["kind"], namespace=meta["namespace"], name=meta["name"],
                uid=meta["uid"],
                owner_reference=dict(kopf.build_owner_reference(body)),  # type: ignore[arg-type]
                status=status.own_status(live), live_status=live)
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
        if self.authority is not None:
            self.authority.forget(namespace, render.identity_secret_name(name))

    def _remember_gone(self, uid: str) -> None:
        self.gone[uid] = None
        while len(self.gone) > GONE_REMEMBERED:
            self.gone.popitem(last=False)

    def _load_spec(self, state: ResourceState, body: Mapping[str, Any]) -> bool:
        """Parse, validate and render a generation once; whether it was a new one."""
        generation = body["metadata"].get("generation")
        if state.parsed and generation is not None and generation == state.generation:
            return False
        state.generation = generation
        state.parsed = True
        parsed = validate_resource(body, source=f"{state.namespace}/{state.name}")
        if isinstance(parsed, list):
            # Invalid: leave the children (and the last good pods) exactly as they are.
            state.manifest, state.errors = None, parsed
            return True
        state.manifest, state.errors = parsed, []
        state.desired = {
            (child["kind"], child["metadata"]["name"]): DesiredChild(child,
                                                                     render.spec_hash(child))
            for child in render.desired_children(parsed, state.namespace, self.settings)}
        return True

    # --- kopf's handler: a new or changed Capability or Actor, or one seen at start ----------

    async def reconcile(self, raw_body: Mapping[str, Any], *,
                        created: bool = False) -> ReconcileReport:
        """Validate the spec (once per generation), apply every child not known to be in
        sync, write status. ``created``: the resource is new, so its children are created
        without being looked up first. Raises on API failures."""
        body = dict(raw_body)  # kopf's view holds the plain JSON values underneath
        state = self._state(body)
        async with state.lock:
            state.live_status = dict(body.get("status") or {})
            new_spec = self._load_spec(state, body)
            if state.errors:
                wrote = await self._write_status(state, status.failure_status(
                    "InvalidSpec", describe_errors(state.errors),
                    previous=self._previous(state), generation=state.generation,
                    now=status.now_rfc3339()), handled=True)
                report = ReconcileReport(errors=state.errors, status_written=wrote)
            else:
                writes = await self._apply(state, created=created)
                wrote = await self._report(state, handled=True)
                report = ReconcileReport(errors=[], writes=writes, status_written=wrote)
        if new_spec and state.kind == "Capability":
            await self.refresh_mcp_bundle(state.namespace)
        return report

    async def _ensure_identity(self, state: ResourceState) -> int:
        """With the operator's own authority: the workload's certificate Secret, before the
        pods that mount it; the writes made (none while it is valid)."""
        if self.authority is None or state.manifest is None:
            return 0
        spec = workload_leaf(state.manifest, state.namespace, self.settings,
                             state.owner_reference)
        if spec is None:
            return 0
        try:
            return await self.authority.ensure(spec)
        except AuthorityError as exc:
            raise ChildConflictError(str(exc)) from exc

    async def _apply(self, state: ResourceState, *, created: bool) -> int:
        """Bring every desired child not known to be in sync up to date; the writes made.
        A failure that needs a person (a conflict, a refusal) is also written to status."""
        writes = await self._ensure_identity(state)
        state.applying = True
        try:
            with self.children_first.writing_children():
                for phase in apply_phases(state.desired):
                    writes += await self._apply_phase(state, phase, created=created)
            writes += await self._retire_canary(state)
        except (ChildConflictError, ApiError) as exc:
            if isinstance(exc, ChildConflictError) or not exc.retriable:
                reason = exc.reason if isinstance(exc, ChildConflictError) else "ApplyFailed"
                await self._write_status(state, status.failure_status(
                    reason, str(exc), previous=self._previous(state),
                    generation=state.generation, now=status.now_rfc3339()))
            raise
        finally:
            state.applying = False
        return writes

    async def _apply_phase(self, state: ResourceState, phase: list[ChildKey], *,
                           created: bool) -> int:
        """Apply a phase's children not known to be in sync, concurrently; the writes made.
        Every child is tried; then the first failure is raised."""
        work = []
        for key in phase:
            want, record = state.desired[key], state.children.get(key)
            if record is not None and not record.deleted and record.version is not None \
                    and record.digest == want.digest:
                continue  # verified at a version no event has moved past
            create_first = record.deleted if record is not None else created
            work.append(self._apply_child(state, key, want, create_first=create_first))
        results = await asyncio.gather(*work, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return sum(result for result in results if isinstance(result, int))

    async def _retire_canary(self, state: ResourceState) -> int:
        """Scale a canary whose ``spec.canary`` is gone (promoted or dropped) to 0, once:
        while status still says it ran. The operator deletes no children (no RBAC for it)."""
        writes = 0
        assert state.manifest is not None
        for retired in render.retired_canary(state.manifest, state.namespace,
                                             state.live_status):
            meta = retired["metadata"]
            try:
                await self.client.merge_patch(retired["apiVersion"], retired["kind"],
                                              state.namespace, meta["name"],
                                              {"spec": retired["spec"]})
            except NotFoundError:
                continue  # never created, or removed by hand: nothing runs
            self.metrics.child_writes.labels(retired["kind"], "patch").inc()
            writes += 1
        return writes

    def _with_owner(self, state: ResourceState, manifest: Manifest) -> Manifest:
        return {**manifest, "metadata": {**manifest["metadata"],
                                         "ownerReferences": [state.owner_reference]}}

    async def _create_child(self, state: ResourceState, key: ChildKey,
                            want: DesiredChild) -> Manifest | None:
        """POST the child; None when it already exists (409 AlreadyExists)."""
        try:
            created = await self.client.create(self._with_owner(state, want.manifest))
        except ConflictError:
            return None
        self.metrics.child_writes.labels(key[0], "create").inc()
        return created

    async def _apply_child(self, state: ResourceState, key: ChildKey, want: DesiredChild, *,
                           create_first: bool) -> int:
        """Create the child or patch it back to what was rendered; never create it twice."""
        if state.uid in self.gone:
            return 0  # deleted meanwhile: its children would be orphans
        if create_first:
            created = await self._create_child(state, key, want)
            if created is not None:
                self._record(state, key, created, want.digest)
                return 1
        manifest = want.manifest
        try:
            live = self.listed_children.pop((state.uid, *key), None) or await self.client.get(
                manifest["apiVersion"], key[0], state.namespace, key[1])
        except NotFoundError:
            created = await self._create_child(state, key, want)
            if created is None:  # created by someone between our GET and POST: next round
                raise ApiError(409, "AlreadyExists",
                               f"{key[0]} {key[1]} appeared meanwhile") from None
            self._record(state, key, created, want.digest)
            return 1
        patch = child_patch(manifest, live, state.kind, state.owner_reference)
        if patch is None:
            self._record(state, key, live, want.digest)
            return 0
        patched = await self.client.merge_patch(manifest["apiVersion"], key[0], state.namespace,
                                                key[1], patch)
        self.metrics.child_writes.labels(key[0], "patch").inc()
        self._record(state, key, patched, want.digest)
        return 1

    def _record(self, state: ResourceState, key: ChildKey, live: Mapping[str, Any],
                digest: str) -> None:
        meta = live.get("metadata") or {}
        state.children[key] = ChildRecord(meta.get("uid"), meta.get("resourceVersion"), digest)
        if key[0] in _WORKLOAD_KINDS:
            state.workloads[key] = status.workload_view(live)

    # --- child events and the per-owner queue ------------------------------------------------

    def child_changed(self, event_type: str | None, child: Mapping[str, Any]) -> str:
        """Take in an event (or a listing) of a child; what it amounted to: ``own-write`` (or
        already seen), ``in-sync``, ``queued`` (its owner will reconcile) or why it was left
        alone (``unowned``, ``unknown-owner``, ``not-desired``, ``stale``). No I/O."""
        meta = child.get("metadata") or {}
        owner = controller_of(child)
        if owner is None or owner.get("kind") not in OWNER_KINDS \
                or owner.get("apiVersion") != API_VERSION:
            return "unowned"
        state = self.states.get((str(owner["kind"]), meta.get("namespace", ""),
                                 owner.get("name", "")))
        key = (str(child.get("kind")), str(meta.get("name")))
        if state is None or state.uid != owner.get("uid") or state.manifest is None:
            # Its owner's own reconcile covers it once it runs; a listed child (and what
            # happens to it next) is kept for that reconcile, which then reads nothing.
            listed = (str(owner.get("uid")), *key)
            if event_type is None or listed in self.listed_children:
                if event_type == "DELETED":
                    del self.listed_children[listed]
                else:
                    self.listed_children[listed] = dict(child)
            return "unknown-owner"
        if self.listed_children:  # this event is newer than what was listed
            self.listed_children.pop((state.uid, *key), None)
        want = state.desired.get(key)
        if want is None:
            return "not-desired"
        record = state.children.get(key)
        if event_type == "DELETED":
            if record is not None and record.uid is not None and record.uid != meta.get("uid"):
                return "stale"  # an older incarnation; the current one is known
            state.children[key] = ChildRecord(meta.get("uid"), None, want.digest, deleted=True)
            self.enqueue(state, "child-deleted")
            return "queued"
        version = meta.get("resourceVersion")
        if record is not None and not record.deleted and record.uid == meta.get("uid") \
                and record.version == version and record.digest == want.digest:
            return "own-write"
        try:
            in_sync = child_patch(want.manifest, child, state.kind,
                                  state.owner_reference) is None
        except ChildConflictError:
            in_sync = False
        state.children[key] = ChildRecord(meta.get("uid"), version if in_sync else None,
                                          want.digest)
        if key[0] in _WORKLOAD_KINDS:
            state.workloads[key] = status.workload_view(child)
        if not in_sync:
            self.enqueue(state, "child-changed")
            return "queued"
        if key[0] in _WORKLOAD_KINDS and not state.applying \
                and self._status_stale(state, state.status):
            # The workload's (or its canary's) readiness moved: status has news.
            self.enqueue(state, "child-changed")
            return "queued"
        return "in-sync"

    @property
    def pending(self) -> int:
        """Reconciles queued or running (child events, retries, resync): 0 when idle."""
        return len(self._tasks)

    def enqueue(self, state: ResourceState, trigger: str) -> None:
        """Reconcile ``state`` soon; a reconcile already pending covers this one too."""
        if state.queued is not None:
            return
        state.queued = trigger
        task = asyncio.get_running_loop().create_task(self._run_queued(state))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _retry_later(self, state: ResourceState, delay: float) -> None:
        def fire() -> None:
            self._retries.discard(handle)
            if self.states.get(state.key) is state:
                self.enqueue(state, "retry")
        handle = asyncio.get_running_loop().call_later(delay, fire)
        self._retries.add(handle)

    async def _run_queued(self, state: ResourceState) -> None:
        async with state.lock:
            trigger, state.queued = state.queued, None
            if trigger is None or self.states.get(state.key) is not state:
                return
            with self.metrics.timed(trigger) as outcome:
                try:
                    outcome.result = "written" if await self._converge(state) else "ok"
                except (ApiError, ChildConflictError) as exc:
                    outcome.result = "error"
                    retriable = isinstance(exc, ApiError) and exc.retriable
                    self._retry_later(state, self.settings.retry_delay_seconds
                                      * (1 if retriable else 6))
                    logger.warning("reconcile of %s %s/%s failed (retrying): %s", state.kind,
                                   state.namespace, state.name, exc)

    async def _converge(self, state: ResourceState) -> bool:
        """Recreate deleted children, undo edits, bring status up to date; whether anything
        was written."""
        if state.manifest is None:
            return False
        if any(record.deleted for record in state.children.values()) \
                and not await self._owner_alive(state):
            return False
        writes = await self._apply(state, created=False)
        return await self._report(state) or writes > 0

    async def _owner_alive(self, state: ResourceState) -> bool:
        """Re-read the owner before recreating a deleted child: when the owner is being
        deleted (or gone), the child went with it on purpose."""
        try:
            body = await self.client.get(API_VERSION, state.kind, state.namespace, state.name)
        except NotFoundError:
            self.forget(state.namespace, state.name, state.uid, state.kind)
            return False
        meta = body.get("metadata", {})
        return meta.get("uid") == state.uid and not meta.get("deletionTimestamp")

    # --- status ------------------------------------------------------------------------------

    def _previous(self, state: ResourceState) -> list[Mapping[str, Any]] | None:
        conditions = state.status.get("conditions")
        return conditions if isinstance(conditions, list) else None

    def _workload_status(self, state: ResourceState) -> dict[str, Any]:
        view = state.workloads.get(state.workload_key) or {}
        members: list[str] | None = None
        if state.kind == "Actor":
            workload = status.assess_statefulset(view)
            replicas = (view.get("spec") or {}).get("replicas", 1)
            members = render.member_names(state.name, replicas if isinstance(replicas, int)
                                          else 1)
        else:
            workload = status.assess_deployment(view)
        canary = render.canary_status(
            state.manifest, state.workloads.get(("Deployment", render.canary_name(state.name))),
            state.live_status)
        return {**status.workload_status(
            workload, endpoint=render.endpoint(state.name, state.namespace, self.settings),
            selector=render.label_selector(state.name, state.kind),
            previous=self._previous(state), generation=state.generation,
            now=status.now_rfc3339(), members=members), **canary}

    def _status_stale(self, state: ResourceState,
                      than: Mapping[str, Any] | None = None) -> bool:
        """Whether the status the workload now implies differs from ``than``: the live one
        by default; a child event compares with the one the operator last decided (a write
        of it may be on its way)."""
        return status.status_changed({**state.status, **self._workload_status(state)},
                                     state.live_status if than is None else than)

    async def _report(self, state: ResourceState, *, handled: bool = False) -> bool:
        """Write the status the workload implies when it says something new (see
        :meth:`_write_status`). While other owners' children are being written it waits its
        turn (pacing.py), then also says what this one's child events brought meanwhile."""
        if self.children_first.writing and self._status_stale(state):
            state.applying = True  # what child events bring meanwhile goes in this write
            try:
                await self.children_first.settled()
            finally:
                state.applying = False
        return await self._write_status(state, self._workload_status(state), handled=handled)

    async def _write_status(self, state: ResourceState, new: dict[str, Any], *,
                            handled: bool = False) -> bool:
        """Merge ``new`` into the status the operator wants and write it when the live status
        says otherwise; whether it was written. ``handled``: this generation is done, so
        ``observedGeneration`` (kopf's record of it, too) moves up to it."""
        if handled and state.generation is not None:
            new = {**new, "observedGeneration": state.generation}
        state.status = {**state.status, **new}
        if not status.status_changed(state.status, state.live_status):
            return False  # nothing new to say: no write, no event, no watch traffic
        patched = await self.client.merge_patch(API_VERSION, state.kind, state.namespace,
                                                state.name, {"status": state.status},
                                                subresource="status")
        state.live_status = dict(patched.get("status") or state.status)
        return True

    async def warn(self, obj: Mapping[str, Any], reason: str, message: str) -> None:
        """Post a Warning Event about a Capability or Actor (best effort: logged if refused)."""
        try:
            await self.client.create(status.warning_event(obj, reason, message,
                                                          status.now_rfc3339()))
        except ApiError as exc:
            logger.warning("could not post a %s Event: %s", reason, exc)

    # --- the periodic resync -----------------------------------------------------------------

    async def resync(self) -> None:
        """Compare every known resource and child with what the API server lists (a few
        LISTs per namespace, no per-object calls) and queue the owners that need work: what a
        missed watch event or a failed reconcile left. Unchanged resources cost no write."""
        self.listed_children.clear()  # unclaimed since the start: orphans, or owners gone
        for namespace in sorted({namespace for (_, namespace, _) in self.states}):
            await self._resync_namespace(namespace)
        if self.authority is not None:
            await self.authority.renew()

    async def _resync_namespace(self, namespace: str) -> None:
        owners = [state for state in self.states.values() if state.namespace == namespace]
        for kind in sorted({state.kind for state in owners}):
            listed: set[Key] = set()
            for body in await self.client.list_objects(API_VERSION, kind, namespace):
                meta = body.get("metadata") or {}
                key = (kind, namespace, str(meta.get("name")))
                listed.add(key)
                state = self.states.get(key)
                if state is None or state.uid != meta.get("uid"):
                    continue  # kopf's create handler covers it
                if meta.get("generation") != state.generation:
                    await self.reconcile(body)  # a spec change the watch did not bring
                elif not state.lock.locked() and state.queued is None:
                    state.live_status = dict(body.get("status") or {})
            for state in [s for s in owners if s.kind == kind and s.key not in listed]:
                self.forget(namespace, state.name, state.uid, kind)  # deleted, unnoticed
        owners = [state for state in self.states.values()
                  if state.namespace == namespace and state.manifest is not None]
        kinds = sorted({(want.manifest["apiVersion"], key[0])
                        for state in owners for key, want in state.desired.items()})
        for api_version, kind in kinds:
            children = await self.client.list_objects(api_version, kind, namespace,
                                                      label_selector=MANAGED_SELECTOR)
            for child in children:
                self.child_changed(None, child)
            self.children_listed(kind, namespace, children, "resync", owners)
        for state in owners:
            if self._status_stale(state):
                self.enqueue(state, "resync")

    def children_listed(self, kind: str, namespace: str | None,
                        children: list[dict[str, Any]], trigger: str,
                        owners: list[ResourceState] | None = None) -> None:
        """Queue every owner (of ``owners``, else every known one in ``namespace``, or in
        all when None) whose desired child of ``kind`` is missing from this full list of
        them: deleted while no watch saw it. Its reconcile checks the owner is still there,
        then creates the child (one POST; a child created after the list was taken answers
        409 and is read instead)."""
        listed = {(str(owner.get("uid")), str((child.get("metadata") or {}).get("name")))
                  for child in children if (owner := controller_of(child)) is not None}
        for state in self.states.values() if owners is None else owners:
            if state.manifest is None or namespace not in (None, state.namespace):
                continue
            for key, want in state.desired.items():
                if key[0] == kind and (state.uid, key[1]) not in listed:
                    state.children[key] = ChildRecord(None, None, want.digest, deleted=True)
                    self.enqueue(state, trigger)

    # --- the MCP aggregate and the Actors' active count ---------------------------------------

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
                bundle = render.render_mcp_bundle(capabilities, namespace, self.settings)
                digest = render.spec_hash(bundle)
                if self._mcp_written.get(namespace) != digest \
                        and await self._apply_unowned(bundle):
                    self._mcp_written[namespace] = digest

    async def _apply_unowned(self, desired: dict[str, Any]) -> bool:
        """Create or patch an object no single resource owns (the namespace's MCP bundle):
        created without a look first, patched straight away once this operator wrote it.
        False when the name is taken by an object the operator does not manage."""
        meta = desired["metadata"]
        api_version, kind, namespace = desired["apiVersion"], desired["kind"], meta["namespace"]
        if namespace in self._mcp_written:
            try:
                await self.client.merge_patch(api_version, kind, namespace, meta["name"], {
                    key: value for key, value in desired.items()
                    if key not in ("apiVersion", "kind")})
                self.metrics.child_writes.labels(kind, "patch").inc()
                return True
            except NotFoundError:
                pass  # deleted by someone: created again below
        try:
            await self.client.create(desired)
            self.metrics.child_writes.labels(kind, "create").inc()
            return True
        except ConflictError:
            live = await self.client.get(api_version, kind, namespace, meta["name"])
        labels = live.get("metadata", {}).get("labels", {}) or {}
        if labels.get(render.LABEL_MANAGED_BY) != render.MANAGED_BY:
            logger.warning("%s %s/%s exists and is not managed by the operator: left alone",
                           kind, namespace, meta["name"])
            return False
        patch = drift_patch(desired, live)
        if patch is not None:
            await self.client.merge_patch(api_version, kind, namespace, meta["name"], patch)
            self.metrics.child_writes.labels(kind, "patch").inc()
        return True

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
                await self._write_status(state, {"activeActors": count})
        return count

    async def aclose(self) -> None:
        """Stop queued reconciles and retries; close the HTTP client used for pods' metrics."""
        for handle in self._retries:
            handle.cancel()
        self._retries.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()
            self._http = None
