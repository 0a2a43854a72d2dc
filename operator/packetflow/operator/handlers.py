"""kopf handlers: thin adapters from kopf's events to the :class:`Reconciler`.

Handlers are registered on a registry built per operator (:func:`build_registry`), so tests
and the benchmark can run several operators, one after another, in one process.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Final

import kopf

from packetflow.operator import federation_handlers, render
from packetflow.operator.client import ApiError, KubeClient, NotFoundError
from packetflow.operator.metrics import OperatorMetrics
from packetflow.operator.reconcile import ChildConflictError, Reconciler, describe_errors
from packetflow.operator.settings import OperatorSettings
from packetflow.spec import API_VERSION, GROUP, VERSION

CAPABILITIES: Final = (GROUP, VERSION, "capabilities")
ACTORS: Final = (GROUP, VERSION, "actors")
OWNER_RESOURCES: Final = (CAPABILITIES, ACTORS)
CHILD_RESOURCES: Final = (("", "v1", "configmaps"), ("", "v1", "services"),
                          ("apps", "v1", "deployments"), ("apps", "v1", "statefulsets"))
log = logging.getLogger("packetflow.operator")
# kopf keeps its bookkeeping in annotations under our own prefix, not kopf.zalando.org.
ANNOTATION_PREFIX: Final = "packetflow.io"


@dataclass
class OperatorContext:
    """Everything the handlers share, passed to them as kopf's ``memo``."""

    settings: OperatorSettings
    metrics: OperatorMetrics
    client: KubeClient
    reconciler: Reconciler
    resync_task: asyncio.Task[None] | None = None

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


def login(memo: kopf.Memo, **kwargs: Any) -> kopf.ConnectionInfo:
    """In-cluster service account first, else the kubeconfig; the children's client shares it."""
    info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
    if info is None:
        raise kopf.LoginError("no in-cluster service account and no kubeconfig ($KUBECONFIG)")
    _ctx(memo).client.configure(info)
    return info


def kopf_settings(ours: OperatorSettings) -> kopf.OperatorSettings:
    """kopf's settings for PacketFlow: own annotation prefix, no scanning, warnings as Events."""
    settings = kopf.OperatorSettings()
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration")
    # Least privilege: without scanning kopf neither lists namespaces nor watches CRDs (the
    # chart installs the CRD before the operator starts), so RBAC needs neither.
    settings.scanning.disabled = True
    # One Event per successful handler would be noise (and API load); warnings still post.
    settings.posting.level = logging.WARNING
    # Re-list now and then so a missed watch event is eventually noticed (drift, readiness).
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    return settings


async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    """Stop the resync, close the children's HTTP client."""
    ctx = _ctx(memo)
    if ctx.resync_task is not None:
        ctx.resync_task.cancel()
        await asyncio.gather(ctx.resync_task, return_exceptions=True)
    await ctx.reconciler.aclose()
    await ctx.client.aclose()


async def reconcile_resource(body: kopf.Body, reason: str, memo: kopf.Memo,
                             logger: kopf.Logger, **_: Any) -> None:
    """Create, update or resume a Capability or Actor: render the children, apply the
    difference, write status."""
    ctx = _ctx(memo)
    with ctx.metrics.timed(str(reason)) as outcome:
        try:
            report = await ctx.reconciler.reconcile(body)
        except ChildConflictError as exc:
            outcome.result = "conflict"
            kopf.warn(body, reason=exc.reason, message=str(exc))
            raise kopf.TemporaryError(str(exc), delay=ctx.settings.retry_delay_seconds * 6) \
                from exc
        except ApiError as exc:
            outcome.result = "api-error"
            # Rejections (403, 422) need a person; retry slowly. Transient errors: soon.
            delay = ctx.settings.retry_delay_seconds * (1 if exc.retriable else 6)
            raise kopf.TemporaryError(f"API call failed: {exc}", delay=delay) from exc
        if report.errors:
            outcome.result = "invalid"
            message = describe_errors(report.errors)
            kopf.warn(body, reason="InvalidSpec", message=message)
            logger.warning("invalid spec, children left as they are: %s", message)


async def startup(memo: kopf.Memo, **_: Any) -> None:
    """Start the periodic resync of every known resource (when enabled)."""
    ctx = _ctx(memo)
    if ctx.settings.resync_seconds > 0:
        ctx.resync_task = asyncio.get_running_loop().create_task(resync_forever(ctx))


async def resync_forever(ctx: OperatorContext) -> None:
    """Reconcile every known resource each ``resync_seconds``, events or not.

    This heals what a missed watch event or a failed child-event handler left. It is the
    operator's own loop, not a kopf timer: kopf timers put a finalizer on every resource,
    and then no Capability could be deleted while the operator is down.
    """
    while True:
        await asyncio.sleep(ctx.settings.resync_seconds)
        for kind, namespace, name in list(ctx.reconciler.states):
            with ctx.metrics.timed("resync") as outcome:
                try:
                    body = await ctx.client.get(API_VERSION, kind, namespace, name)
                    report = await ctx.reconciler.reconcile(body)
                except NotFoundError:
                    outcome.result = "gone"  # its DELETED event forgets it
                    continue
                except (ApiError, ChildConflictError) as exc:
                    outcome.result = "error"  # tried again on the next round
                    log.warning("resync of %s %s/%s failed: %s", kind, namespace, name, exc)
                    continue
                outcome.result = "invalid" if report.errors else "ok"
            if kind == "Actor" and not report.errors:
                # Counted here, not on every event: one GET per member pod.
                try:
                    await ctx.reconciler.refresh_active_actors(namespace, name)
                except ApiError as exc:
                    log.warning("could not write the active count of %s/%s: %s",
                                namespace, name, exc)


async def resource_event(event: kopf.RawEvent, body: kopf.Body, namespace: str | None,
                         name: str | None, uid: str | None, memo: kopf.Memo,
                         logger: kopf.Logger, **_: Any) -> None:
    """Forget a deleted Capability or Actor (its children go with it: ownerReferences)."""
    if event["type"] != "DELETED" or not namespace or not name:
        return
    ctx = _ctx(memo)
    kind = str(body.get("kind") or "Capability")
    ctx.reconciler.forget(namespace, name, uid, kind)
    if kind == "Capability":
        try:
            await ctx.reconciler.refresh_mcp_bundle(namespace)
        except ApiError as exc:
            # Not retried here: the next Capability event in the namespace rewrites it.
            logger.warning("could not update the MCP aggregate bundle: %s", exc)


async def child_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo,
                      logger: kopf.Logger, **_: Any) -> None:
    """A child changed: recreate it when deleted, undo edits, carry workload readiness up."""
    ctx = _ctx(memo)
    trigger = "child-deleted" if event["type"] == "DELETED" else "child-changed"
    with ctx.metrics.timed(trigger) as outcome:
        try:
            wrote = await ctx.reconciler.child_changed(event["type"], body)
        except (ApiError, ChildConflictError) as exc:
            # Event handlers are not retried; the owner's resync (re-list) or next event is.
            outcome.result = "error"
            logger.warning("could not reconcile after a child event: %s", exc)
            return
        outcome.result = "written" if wrote else "ok"


def build_registry() -> kopf.OperatorRegistry:
    """A registry with every PacketFlow handler (login, Capability, Actor, children)."""
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(login)
    kopf.on.startup(registry=registry)(startup)
    kopf.on.cleanup(registry=registry)(cleanup)
    for resource in OWNER_RESOURCES:
        for register in (kopf.on.create, kopf.on.update, kopf.on.resume):
            register(*resource, registry=registry, id="reconcile")(reconcile_resource)
        kopf.on.event(*resource, registry=registry, id="forget")(resource_event)
    # kopf filters by label on its side; in a real cluster the watch still carries every
    # object of the kind, which is why only the four child kinds are watched.
    for group, version, plural in CHILD_RESOURCES:
        kopf.on.event(group, version, plural, registry=registry, id=f"child-{plural}",
                      labels={render.LABEL_MANAGED_BY: render.MANAGED_BY})(child_event)
    federation_handlers.register(registry)
    return registry


async def run_operator(
    ctx: OperatorContext,
    *,
    namespaces: Collection[str] = (),
    clusterwide: bool = False,
    liveness_endpoint: str | None = None,
    stop_flag: asyncio.Event | None = None,
    ready_flag: asyncio.Event | None = None,
) -> None:
    """Run the kopf operator with PacketFlow's handlers until ``stop_flag`` is set."""
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
        self.error: BaseException | None = None

    def _main(self) -> None:
        try:
            asyncio.run(kopf.operator(
                registry=build_registry(),
                settings=kopf_settings(self.ctx.settings),
                memo=kopf.Memo(ctx=self.ctx), namespaces=self.namespaces,
                clusterwide=self.clusterwide, standalone=True,
                stop_flag=self._stop, ready_flag=self._ready))
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

    def stop(self, timeout: float = 10.0) -> None:
        """Ask kopf to stop and wait for the thread to finish."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the operator did not stop within {timeout}s")
        self._thread = None
