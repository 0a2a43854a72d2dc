"""kopf handlers: login, start and stop; the Federations' handlers (federation_handlers.py).

kopf runs login, Federations, Events' delivery and probes; Capabilities, Actors and their
children are watched by the operator's own loops (:mod:`packetflow.operator.watching`),
started from kopf's startup handler and stopped by its cleanup handler.

Handlers are registered on a registry built per operator (:func:`build_registry`), so tests
and the benchmark can run several operators, one after another, in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Collection, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar, cast

import kopf

from packetflow.operator import federation_handlers, render
from packetflow.operator.client import ApiError, KubeClient
from packetflow.operator.federation import LABEL_FEDERATION
from packetflow.operator.metrics import OperatorMetrics
from packetflow.operator.reconcile import (
    MANAGED_SELECTOR,
    ChildConflictError,
    Reconciler,
    describe_errors,
)
from packetflow.operator.settings import OperatorSettings
from packetflow.operator.watching import (
    ChildEvents,
    OwnerEvents,
    OwnerQueue,
    WatchTarget,
    owner_targets,
    watch_forever,
)

# The children's kinds the operator's own watches follow (by label): every kind a Capability
# or an Actor can have, the opt-in ones only when their setting is on.
CHILD_KINDS: Final = (("v1", "ConfigMap"), ("v1", "Service"), ("apps/v1", "Deployment"),
                      ("apps/v1", "StatefulSet"))
POLICY_KINDS: Final = (("networking.k8s.io/v1", "NetworkPolicy"),)
IDENTITY_KINDS: Final = (("v1", "ServiceAccount"), ("cert-manager.io/v1", "Certificate"))
CHILDREN_FIRST_LIST_SECONDS: Final = 10.0  # the owners' watches wait this long at most
# What kopf still watches of the children: only the Federations' (federation_handlers).
FEDERATION_CHILD_RESOURCES: Final = (("", "v1", "configmaps"), ("", "v1", "services"),
                                     ("apps", "v1", "deployments"))
log = logging.getLogger("packetflow.operator")
T = TypeVar("T")


@dataclass
class OperatorContext:
    """Everything the handlers share, passed to them as kopf's ``memo``."""

    settings: OperatorSettings
    metrics: OperatorMetrics
    client: KubeClient
    reconciler: Reconciler
    resync_task: asyncio.Task[None] | None = None
    # Where the operator's own watches look: namespaces, or [None] for every namespace.
    namespaces: list[str | None] = field(default_factory=list)
    watch_tasks: list[asyncio.Task[None]] = field(default_factory=list)
    owner_queue: OwnerQueue | None = None
    _side_tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def pending(self) -> int:
        """Reconciles queued or running (owner events, child events, retries)."""
        queued = self.owner_queue.pending if self.owner_queue is not None else 0
        return queued + self.reconciler.pending

    @classmethod
    def create(cls, settings: OperatorSettings,
               metrics: OperatorMetrics | None = None) -> OperatorContext:
        """A context with a client that gets its credentials at kopf's login."""
        metrics = metrics if metrics is not None else OperatorMetrics()
        client = KubeClient()
        return cls(settings, metrics, client, Reconciler(client, settings, metrics))


def _ctx(memo: Any) -> OperatorContext:
    ctx = memo.ctx
    assert isinstance(ctx, OperatorContext)
    return ctx


async def login(memo: kopf.Memo, **kwargs: Any) -> kopf.ConnectionInfo:
    """In-cluster service account first, else the kubeconfig; the operator's own client
    shares it. On the loop (reading two small files), so the client's waiters wake there."""
    info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
    if info is None:
        raise kopf.LoginError("no in-cluster service account and no kubeconfig ($KUBECONFIG)")
    _ctx(memo).client.configure(info)
    return info


class ObservedGenerationDiffBase(kopf.DiffBaseStorage):
    """kopf's record of the last handled state is ``status.observedGeneration``, which the
    operator writes itself, in the status write a successful reconcile makes anyway.

    kopf stores its "last handled configuration" with a write of its own after every handler
    (an annotation patch, or a status patch of its own): one more write per Federation, and
    one more watch event. Here the essence kopf compares is the spec's generation (the API
    server bumps it on every spec change, and only then), and the stored one is the generation
    the operator finished with: unseen (create), older (update) or equal (nothing to do, or
    resume at start). A label or annotation change is no update: nothing renders from them.
    A failed reconcile leaves observedGeneration behind, so kopf's retries keep their cause.
    """

    def build(self, *, body: kopf.Body,
              extra_fields: Iterable[Any] | None = None) -> kopf.BodyEssence:
        """The essence kopf diffs: only the generation."""
        return cast(kopf.BodyEssence, {"spec": {"generation": body.metadata.get("generation")}})

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        """The handled essence: the generation in ``status.observedGeneration``, if any."""
        observed = (body.get("status") or {}).get("observedGeneration")
        if observed is None:
            return None
        return cast(kopf.BodyEssence, {"spec": {"generation": observed}})

    def store(self, *, body: kopf.Body, patch: kopf.Patch,
              essence: kopf.BodyEssence) -> None:
        """Nothing to add: the reconcile's own status write already stored it."""


def kopf_settings(ours: OperatorSettings) -> kopf.OperatorSettings:
    """kopf's settings for PacketFlow: own annotation prefix, no scanning, warnings as Events,
    the handled generation as the diff base, children watched by label on the server."""
    settings = kopf.OperatorSettings()
    # A handler's progress is written (under status.kopf) only while it is being retried
    # (TemporaryError); kopf's annotation storage would also stamp a marker annotation on
    # every object, one more write per Federation.
    settings.persistence.progress_storage = kopf.StatusProgressStorage()
    settings.persistence.diffbase_storage = ObservedGenerationDiffBase()
    # Least privilege: without scanning kopf neither lists namespaces nor watches CRDs (the
    # chart installs the CRD before the operator starts), so RBAC needs neither.
    settings.scanning.disabled = True
    # One Event per successful handler would be noise (and API load); warnings still post.
    settings.posting.level = logging.WARNING
    # kopf watches only the Federations' children (the operator's own watches follow the
    # rest), and the API server selects them: not every ConfigMap of the namespace.
    for resource in FEDERATION_CHILD_RESOURCES:
        settings.watching.label_selectors[resource] = LABEL_FEDERATION
    # Watches end after this long and resume from their last resourceVersion (bookmarks keep
    # it fresh); what a watch cannot bring, the operator's resync finds.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    return settings


async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    """Stop the watches and the resync, close the children's HTTP client."""
    ctx = _ctx(memo)
    tasks = [*ctx.watch_tasks, *ctx._side_tasks,
             *([ctx.resync_task] if ctx.resync_task is not None else [])]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if ctx.owner_queue is not None:
        await ctx.owner_queue.aclose()
    await ctx.reconciler.aclose()
    await ctx.client.aclose()


async def reconcile_owner(ctx: OperatorContext, body: Mapping[str, Any], reason: str) -> None:
    """Create, update or resume a Capability or Actor: render the children, apply what is
    not known to be in sync, write status when it changed. Failures raise
    :class:`kopf.TemporaryError` with the delay before the next try."""
    with ctx.metrics.timed(reason) as outcome:
        try:
            report = await ctx.reconciler.reconcile(body, created=reason == "create")
        except ChildConflictError as exc:
            outcome.result = "conflict"
            await ctx.reconciler.warn(body, exc.reason, str(exc))
            raise kopf.TemporaryError(str(exc), delay=ctx.settings.retry_delay_seconds * 6) \
                from exc
        except ApiError as exc:
            outcome.result = "api-error"
            # Rejections (403, 422) need a person; retry slowly. Transient errors: soon.
            delay = ctx.settings.retry_delay_seconds * (1 if exc.retriable else 6)
            raise kopf.TemporaryError(f"API call failed: {exc}", delay=delay) from exc
        if report.errors:
            outcome.result = "invalid"
            if report.status_written:  # news: one Event with it, not one per restart
                message = describe_errors(report.errors)
                await ctx.reconciler.warn(body, "InvalidSpec", message)
                log.warning("%s %s/%s: invalid spec, children left as they are: %s",
                            body.get("kind"), body["metadata"].get("namespace"),
                            body["metadata"].get("name"), message)


async def startup(memo: kopf.Memo, **_: Any) -> None:
    """Start the operator's own watches (Capabilities, Actors, children) and the periodic
    resync. Started from kopf's startup handler, so kopf's cleanup stops them."""
    ctx = _ctx(memo)
    loop = asyncio.get_running_loop()
    ctx.owner_queue = OwnerQueue(lambda body, reason: reconcile_owner(ctx, body, reason))
    first_lists: list[asyncio.Event] = []
    for namespace in ctx.namespaces:
        for api_version, kind in child_kinds(ctx.settings):
            target = WatchTarget(api_version, kind, namespace, MANAGED_SELECTOR)
            children = ChildEvents(ctx.reconciler, ctx.metrics.count_child_event, kind,
                                   namespace)
            first_lists.append(children.listed_once)
            ctx.watch_tasks.append(loop.create_task(watch_forever(ctx.client, target,
                                                                  children)))
    for target in owner_targets(ctx.namespaces):
        # A Capability leaving a namespace may change its MCP aggregate bundle.
        on_deleted = (lambda namespace: _refresh_mcp_bundle(ctx, namespace)) \
            if target.kind == "Capability" else None
        events = OwnerEvents(target.kind, ctx.reconciler, ctx.owner_queue, target.namespace,
                             on_deleted)
        ctx.watch_tasks.append(loop.create_task(_after(
            first_lists, functools.partial(watch_forever, ctx.client, target, events))))
    if ctx.reconciler.authority is not None:  # the chart's gateway waits for its Secret
        task = loop.create_task(ctx.reconciler.authority.issue_chart_identities())
        ctx._side_tasks.add(task)
        task.add_done_callback(ctx._side_tasks.discard)
    if ctx.settings.resync_seconds > 0:
        ctx.resync_task = asyncio.get_running_loop().create_task(resync_forever(ctx))


async def _after(first_lists: list[asyncio.Event],
                 owners: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Watch the owners once the children are listed: a resuming owner then finds its
    children in that list and reads none. Bounded, so a list that keeps failing (it is
    retried meanwhile) holds no owner back for long. (Not in the startup handler: kopf logs
    in only after it, and the lists need the login.)"""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(listed.wait() for listed in first_lists)),
                               CHILDREN_FIRST_LIST_SECONDS)
    await owners()


async def resync_forever(ctx: OperatorContext) -> None:
    """Every ``resync_seconds``, compare every known resource and child with the API server's
    lists, and count each Actor's active actors.

    This heals what a missed watch event or a failed reconcile left, at a few LISTs per
    namespace: unchanged resources cost no write. It is the operator's own loop, not a kopf
    timer: kopf timers put a finalizer on every resource, and then no Capability could be
    deleted while the operator is down.
    """
    while True:
        await asyncio.sleep(ctx.settings.resync_seconds)
        try:
            await ctx.reconciler.resync()
        except ApiError as exc:
            log.warning("resync failed (tried again next round): %s", exc)
        # Counted here, not on every event: one GET per member pod.
        for kind, namespace, name in list(ctx.reconciler.states):
            if kind != "Actor":
                continue
            try:
                await ctx.reconciler.refresh_active_actors(namespace, name)
            except ApiError as exc:
                log.warning("could not write the active count of %s/%s: %s",
                            namespace, name, exc)


def child_kinds(settings: OperatorSettings) -> list[tuple[str, str]]:
    """(apiVersion, kind) of every child the settings can render."""
    # The operator's own authority writes Secrets itself: no cert-manager Certificates.
    identity = IDENTITY_KINDS[:1] if render.operator_issued(settings) else IDENTITY_KINDS
    return [*CHILD_KINDS, *(POLICY_KINDS if settings.network_policies else ()),
            *(identity if settings.mtls_issuer else ())]


def _refresh_mcp_bundle(ctx: OperatorContext, namespace: str) -> None:
    """Rewrite the namespace's MCP aggregate bundle soon (a Capability left it)."""
    if namespace != ctx.settings.mcp_aggregate_namespace:
        return
    task = asyncio.get_running_loop().create_task(_refresh_mcp_bundle_now(ctx, namespace))
    ctx._side_tasks.add(task)
    task.add_done_callback(ctx._side_tasks.discard)


async def _refresh_mcp_bundle_now(ctx: OperatorContext, namespace: str) -> None:
    try:
        await ctx.reconciler.refresh_mcp_bundle(namespace)
    except ApiError as exc:
        # Not retried here: the next Capability event in the namespace rewrites it.
        log.warning("could not update the MCP aggregate bundle: %s", exc)


def build_registry() -> kopf.OperatorRegistry:
    """A registry with every kopf handler (login, start and stop, Federations)."""
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(login)
    kopf.on.startup(registry=registry)(startup)
    kopf.on.cleanup(registry=registry)(cleanup)
    # Capabilities, Actors and their children have the operator's own watches (startup,
    # watching.py).
    federation_handlers.register(registry)
    return registry


async def run_operator(
    ctx: OperatorContext,
    *,
    namespaces: Collection[str] = (),
    clusterwide: bool = False,
    liveness_endpoint: str | None = None,
    stop_flag: asyncio.Event | threading.Event | None = None,
    ready_flag: asyncio.Event | threading.Event | None = None,
) -> None:
    """Run the kopf operator with PacketFlow's handlers until ``stop_flag`` is set."""
    ctx.namespaces = [None] if clusterwide else list(namespaces)
    await kopf.operator(
        registry=build_registry(),
        settings=kopf_settings(ctx.settings),
        memo=kopf.Memo(ctx=ctx),
        namespaces=list(namespaces),
        clusterwide=clusterwide,
        # One operator replica (the chart's Deployment uses the Recreate strategy): no peering
        # objects, so no RBAC for them either.
        standalone=True,
        liveness_endpoint=liveness_endpoint,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )


class OperatorThread:
    """The operator on its own event loop in a background thread (tests, benchmarks).

    kopf cancels every task created in its loop after it started when it stops (it assumes the
    loop is its own), so an operator embedded in someone else's loop would cancel their tasks.
    """

    def __init__(self, ctx: OperatorContext, *, namespaces: Collection[str] = (),
                 clusterwide: bool = False) -> None:
        self.ctx = ctx
        self.namespaces = list(namespaces)
        self.clusterwide = clusterwide
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None

    async def _operate(self) -> None:
        self.loop = asyncio.get_running_loop()
        await run_operator(self.ctx, namespaces=self.namespaces, clusterwide=self.clusterwide,
                           stop_flag=self._stop, ready_flag=self._ready)

    def _main(self) -> None:
        try:
            asyncio.run(self._operate())
        except BaseException as exc:  # reported to the starter instead of dying silently
            self.error = exc
            self._ready.set()

    def start(self, timeout: float = 10.0) -> None:
        """Start the operator and wait until kopf says it is ready."""
        self._thread = threading.Thread(target=self._main, name="packetflow-operator",
                                        daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the operator was not ready within {timeout}s")
        if self.error is not None:
            raise RuntimeError(f"the operator failed to start: {self.error!r}")

    def call(self, work: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        """Run ``work`` on the operator's loop and wait for its result (from another thread)."""
        if self.loop is None:
            work.close()
            raise RuntimeError("the operator is not running")
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask kopf to stop and wait for the thread to finish."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the operator did not stop within {timeout}s")
        self._thread = None
        self.loop = None
