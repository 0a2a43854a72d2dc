"""kopf handlers for Federations, and their reconcile I/O.

A Federation is validated, its children (:mod:`packetflow.operator.federation`) applied, and
its status written from the gateway Deployment and the gateway's own ``/status`` report, which
is read again on a timer (trust scores and connections change without any Kubernetes event).
An export or import whose SLA breaches grew since the last report becomes a Warning Event.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import httpx
import kopf

from packetflow.manifests import ManifestError, parse_document
from packetflow.operator import federation as render
from packetflow.operator import render as runtime
from packetflow.operator import status as workload
from packetflow.operator.authority import Authority, AuthorityError, leaf_spec
from packetflow.operator.client import ApiError, ConflictError, KubeClient, NotFoundError
from packetflow.operator.drift import drift_patch, narrow_spec_patch
from packetflow.operator.reconcile import controller_of, describe_errors
from packetflow.operator.settings import OperatorSettings
from packetflow.spec import API_VERSION, GROUP, VERSION, Federation

FEDERATIONS: Final = (GROUP, VERSION, "federations")
REPORT_SECONDS: Final = 30.0  # how often the gateways' reports are read, at most
REPORT_TIMEOUT: Final = 5.0
log = logging.getLogger("packetflow.operator.federation")


class ChildConflict(Exception):
    """A child's name is taken by an object this Federation does not control."""


@dataclass
class Known:
    """What the operator keeps about one Federation between events."""

    uid: str
    owner_reference: dict[str, Any]
    generation: int | None = None
    federation: Federation | None = None
    status: dict[str, Any] = field(default_factory=dict)
    body: dict[str, Any] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class FederationReconciler:
    """Applies a Federation's children and keeps its status."""

    def __init__(self, client: KubeClient, settings: OperatorSettings,
                 authority: Authority | None = None) -> None:
        self.client = client
        self.settings = settings
        self.authority = authority  # the operator's own CA (mtls_issuer: operator), if any
        self._accounts: set[str] = set()  # namespaces whose federation account exists
        self.known: dict[tuple[str, str], Known] = {}
        self.task: asyncio.Task[None] | None = None  # the report loop
        self._http: httpx.AsyncClient | None = None

    def status_url(self, name: str, namespace: str) -> str:
        """Where the gateway of ``namespace/name`` reports (settings can redirect it)."""
        template = self.settings.federation_status_url
        if template:
            return template.format(name=name, namespace=namespace,
                                   service=render.local_service_name(name),
                                   port=self.settings.metrics_port)
        return render.status_url(name, namespace, self.settings)

    async def reconcile(self, raw: Mapping[str, Any]) -> list[ManifestError]:
        """Validate, apply every child, write status; spec errors are returned."""
        # kopf's body holds plain dicts under its keys; a copy is kept between events.
        body = copy.deepcopy(dict(raw))
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        known = self._known(body)
        async with known.lock:
            known.generation, known.body = meta.get("generation"), body
            parsed = parse_document(body, source=f"{namespace}/{name}")
            errors = parsed if isinstance(parsed, list) else (
                [ManifestError(f"{namespace}/{name}", "kind", "not a Federation")]
                if not isinstance(parsed, Federation)
                else render.kubernetes_errors(parsed, f"{namespace}/{name}"))
            if errors:
                known.federation = None
                await self._write_status(known, namespace, name, workload.failure_status(
                    "InvalidSpec", describe_errors(errors), previous=_conditions(known),
                    generation=known.generation, now=workload.now_rfc3339()))
                return errors
            assert isinstance(parsed, Federation)
            known.federation = parsed
            try:
                claim = render.render_audit_claim(parsed, namespace, self.settings)
                if claim is not None:
                    # Not owned: deleting the Federation keeps its audit log.
                    await self.apply(claim, None)
                await self._ensure_workload_identity(parsed, namespace, known)
                deployment: dict[str, Any] = {}
                for child in render.desired_children(parsed, namespace, self.settings):
                    deployment = await self.apply(child, known)
            except (ChildConflict, ApiError) as exc:
                if isinstance(exc, ChildConflict) or not exc.retriable:
                    await self._write_status(known, namespace, name, workload.failure_status(
                        "ChildConflict" if isinstance(exc, ChildConflict) else "ApplyFailed",
                        str(exc), previous=_conditions(known), generation=known.generation,
                        now=workload.now_rfc3339()))
                raise
            await self._report(known, namespace, name, deployment)
        return []

    async def _ensure_workload_identity(self, federation: Federation, namespace: str,
                                        known: Known) -> None:
        """With ``mtls_issuer``: the namespace's federation ServiceAccount (created if
        missing, shared, never patched) and, with the operator's own authority, the gateway's
        certificate Secret (cert-manager's Certificate is an ordinary child)."""
        if self.settings.mtls_issuer is None:
            return
        if namespace not in self._accounts:
            with contextlib.suppress(ConflictError):  # another Federation's: the same one
                await self.client.create(render.render_service_account(namespace))
            self._accounts.add(namespace)
        if self.authority is None:
            return
        spec = leaf_spec(namespace, render.workload_secret_name(federation.name),
                         runtime.FEDERATION_SERVICE_ACCOUNT,
                         render.workload_dns_names(federation, namespace, self.settings),
                         self.settings, render.child_labels(federation.name),
                         known.owner_reference)
        try:
            await self.authority.ensure(spec)
        except AuthorityError as exc:
            raise ChildConflict(str(exc)) from exc

    def _known(self, body: Mapping[str, Any]) -> Known:
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        found = self.known.get(key)
        if found is None or found.uid != meta["uid"]:
            found = self.known[key] = Known(
                meta["uid"], dict(kopf.build_owner_reference(body)),  # type: ignore[arg-type]
                status=dict(body.get("status") or {}))
        return found

    def forget(self, namespace: str, name: str, uid: str | None) -> None:
        """A deleted Federation (its children go by ownerReferences; the audit claim stays)."""
        found = self.known.get((namespace, name))
        if found is not None and (uid is None or found.uid == uid):
            del self.known[(namespace, name)]
            if self.authority is not None:
                self.authority.forget(namespace, render.workload_secret_name(name))

    async def apply(self, desired: dict[str, Any], owner: Known | None) -> dict[str, Any]:
        """Create ``desired`` or merge-patch it back; never take over someone else's object."""
        meta = desired["metadata"]
        if owner is not None:
            desired = {**desired, "metadata": {**meta,
                                               "ownerReferences": [owner.owner_reference]}}
        api_version, kind, namespace, name = (desired["apiVersion"], desired["kind"],
                                              meta["namespace"], meta["name"])
        try:
            live = await self.client.get(api_version, kind, namespace, name)
        except NotFoundError:
            try:
                return await self.client.create(desired)
            except ConflictError:
                live = await self.client.get(api_version, kind, namespace, name)
        labels = live.get("metadata", {}).get("labels", {}) or {}
        controller = controller_of(live)
        if labels.get(render.LABEL_FEDERATION) != meta["labels"][render.LABEL_FEDERATION] or (
                owner is not None and controller is not None
                and controller.get("uid") != owner.uid):
            raise ChildConflict(f"{kind} {name} exists and is not this Federation's")
        patch = drift_patch({**desired, "metadata": {k: v for k, v in desired["metadata"].items()
                                                     if k != "ownerReferences"}}, live)
        patch, immutable = narrow_spec_patch(kind, desired, live, patch)
        if owner is not None and controller is None:
            patch = patch or {}
            patch.setdefault("metadata", {})["ownerReferences"] = [owner.owner_reference]
        if immutable:
            raise ChildConflict(f"{kind} {name}: {', '.join(immutable)} cannot change in place")
        if patch is None:
            return live
        return await self.client.merge_patch(api_version, kind, namespace, name, patch)

    async def refresh(self, namespace: str, name: str) -> None:
        """Read the gateway's report again and write status (the timer's work)."""
        known = self.known.get((namespace, name))
        if known is None or known.federation is None:
            return
        async with known.lock:
            try:
                deployment = await self.client.get(
                    "apps/v1", "Deployment", namespace, render.gateway_name(name))
            except NotFoundError:
                deployment = {}
            await self._report(known, namespace, name, deployment)

    async def _report(self, known: Known, namespace: str, name: str,
                      deployment: Mapping[str, Any]) -> None:
        report, error = await self._read_report(name, namespace)
        new = render.federation_status(deployment, report, previous=_conditions(known),
                                       generation=known.generation,
                                       now=workload.now_rfc3339(), error=error)
        for message in render.new_breaches(known.status, new) if report is not None else []:
            kopf.event(kopf.Body(known.body),  # type: ignore[arg-type] # a raw body
                       type="Warning", reason="SlaBreached", message=message)
        await self._write_status(known, namespace, name, new)

    async def _read_report(self, name: str, namespace: str
                           ) -> tuple[dict[str, Any] | None, str | None]:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=REPORT_TIMEOUT)
        url = self.status_url(name, namespace)
        try:
            response = await self._http.get(url)
            response.raise_for_status()
            report = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            return None, f"{url}: {exc}"
        return (report, None) if isinstance(report, dict) else (None, f"{url}: not JSON")

    async def _write_status(self, known: Known, namespace: str, name: str,
                            new: dict[str, Any]) -> None:
        if known.generation is not None:
            new = {**new, "observedGeneration": known.generation}
        merged = {key: value for key, value in {**known.status, **new}.items()
                  if value is not None}
        if known.status and workload.same_status(merged, known.status):
            return
        await self.client.merge_patch(API_VERSION, "Federation", namespace, name,
                                      {"status": new}, subresource="status")
        known.status = merged

    async def aclose(self) -> None:
        """Close the HTTP client used to read reports."""
        if self._http is not None:
            await self._http.aclose()
            self._http = None


def _conditions(known: Known) -> list[Mapping[str, Any]] | None:
    conditions = known.status.get("conditions")
    return conditions if isinstance(conditions, list) else None


# ---------------------------------------------------------------------- kopf wiring

def _reconciler(memo: Any) -> FederationReconciler:
    # Made at startup on the operator's own memo: kopf gives each object a shallow copy of
    # it, so every Federation's handlers share this one reconciler.
    found = memo.federation
    assert isinstance(found, FederationReconciler)
    return found


async def startup(memo: kopf.Memo, **_: Any) -> None:
    """Make the reconciler (the operator's client and settings)."""
    memo.federation = FederationReconciler(memo.ctx.client, memo.ctx.settings,
                                           memo.ctx.reconciler.authority)


async def reconcile_federation(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger,
                               **_: Any) -> None:
    """Create, update or resume a Federation (and start the report loop with the first)."""
    reconciler = _reconciler(memo)
    if reconciler.task is None:
        # Started from a handler, not at startup: the task inherits the handler's context,
        # where kopf's event poster lives (Events about SLA breaches are posted from it).
        reconciler.task = asyncio.get_running_loop().create_task(report_forever(reconciler))
    try:
        errors = await reconciler.reconcile(body)
    except ChildConflict as exc:
        kopf.warn(body, reason="ChildConflict", message=str(exc))
        raise kopf.TemporaryError(str(exc), delay=reconciler.settings.retry_delay_seconds * 6) \
            from exc
    except ApiError as exc:
        delay = reconciler.settings.retry_delay_seconds * (1 if exc.retriable else 6)
        raise kopf.TemporaryError(f"API call failed: {exc}", delay=delay) from exc
    if errors:
        message = describe_errors(errors)
        kopf.warn(body, reason="InvalidSpec", message=message)
        logger.warning("invalid Federation, children left as they are: %s", message)


async def federation_event(event: kopf.RawEvent, namespace: str | None, name: str | None,
                           uid: str | None, memo: kopf.Memo, **_: Any) -> None:
    """Forget a deleted Federation."""
    if event["type"] == "DELETED" and namespace and name:
        _reconciler(memo).forget(namespace, name, uid)


async def child_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo,
                      logger: kopf.Logger, **_: Any) -> None:
    """A gateway child changed or went away: reconcile its Federation again (recreates,
    undoes edits, carries readiness up)."""
    owner = controller_of(body)
    namespace = body.get("metadata", {}).get("namespace")
    if owner is None or owner.get("kind") != "Federation" or not namespace:
        return
    reconciler = _reconciler(memo)
    known = reconciler.known.get((namespace, owner.get("name", "")))
    if known is None or known.uid != owner.get("uid") or not known.body:
        return
    try:
        federation = await reconciler.client.get(API_VERSION, "Federation", namespace,
                                                 str(owner["name"]))
        if not federation.get("metadata", {}).get("deletionTimestamp"):
            await reconciler.reconcile(federation)
    except NotFoundError:
        reconciler.forget(namespace, str(owner["name"]), None)
    except (ApiError, ChildConflict) as exc:
        logger.warning("could not reconcile a Federation after a child event: %s", exc)


async def report_forever(reconciler: FederationReconciler) -> None:
    """Read every gateway's report now and then (trust and connections change without
    Kubernetes events); a kopf-free loop, so no timer finalizers land on Federations."""
    settings = reconciler.settings
    interval = min(REPORT_SECONDS, settings.resync_seconds) if settings.resync_seconds > 0 \
        else REPORT_SECONDS
    while True:
        await asyncio.sleep(interval)
        for namespace, name in list(reconciler.known):
            try:
                await reconciler.refresh(namespace, name)
            except ApiError as exc:
                log.warning("status of Federation %s/%s not written: %s", namespace, name, exc)
            except Exception:  # one Federation's failure must not end the loop for all
                log.exception("status of Federation %s/%s not written", namespace, name)


async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    """Stop the report loop, close its HTTP client."""
    reconciler = _reconciler(memo)
    if reconciler.task is not None:
        reconciler.task.cancel()
        await asyncio.gather(reconciler.task, return_exceptions=True)
    await reconciler.aclose()


def register(registry: kopf.OperatorRegistry) -> None:
    """Add the Federation handlers to ``registry`` (called by ``handlers.build_registry``)."""
    kopf.on.startup(registry=registry, id="federation-startup")(startup)
    kopf.on.cleanup(registry=registry, id="federation-cleanup")(cleanup)
    for register_handler in (kopf.on.create, kopf.on.update, kopf.on.resume):
        register_handler(*FEDERATIONS, registry=registry, id="federation")(
            reconcile_federation)
    kopf.on.event(*FEDERATIONS, registry=registry, id="federation-forget")(federation_event)
    for group, version, plural in (("", "v1", "configmaps"), ("", "v1", "services"),
                                   ("apps", "v1", "deployments")):
        kopf.on.event(group, version, plural, registry=registry,
                      id=f"federation-child-{plural}",
                      labels={render.LABEL_FEDERATION: kopf.PRESENT})(child_event)
