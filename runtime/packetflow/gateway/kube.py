"""Backends on Kubernetes: Capabilities, Actors and their EndpointSlices, watched read-only.

A small list-and-watch client over HTTP (the runtime never imports the operator or a
Kubernetes library): in a pod it authenticates with the service account's token (re-read
for every request, as bound tokens rotate) and trusts the cluster's CA. Everything it calls
is declared once in :data:`GATEWAY_PERMISSIONS`; the chart's RBAC for the gateway is that
list exactly (checked by ``tests/unit/test_chart.py``).

Routing from what it sees (:func:`routes_from`, pure): a Capability ``NAME`` is served by the
ready endpoints of its Service's EndpointSlices (``kubernetes.io/service-name: NAME``, port
``grpc``), its canary by those of ``NAME-canary`` with ``spec.canary.weight`` percent of the
calls; effects, intent and ``spec.traffic`` come from the Capability itself. An Actor's
members are the ready pods behind its Service ``NAME``, named by pod (the member ids
placement uses). Changing ``spec.canary.weight`` (``kubectl patch``, or the routing
controller) changes the split within a watch event. Under mutual TLS every backend must be
the workload the operator runs it as, ``<namespace>/packetflow-<name>`` (its ServiceAccount,
canary included): another workload's certificate is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
import orjson
from pydantic import ValidationError

from packetflow.access import workload_service_account
from packetflow.gateway.routing import ActorBackends, CapabilityBackends, Routes
from packetflow.gateway.settings import GatewaySettings
from packetflow.spec import CANARY_SUFFIX, GROUP, VERSION, Actor, Capability

log = logging.getLogger("packetflow.gateway.kube")

# (API group, resource, verbs): every call this module makes, and nothing else.
GATEWAY_PERMISSIONS: Final = (
    (GROUP, "capabilities", ("list", "watch")),
    (GROUP, "actors", ("list", "watch")),
    ("discovery.k8s.io", "endpointslices", ("list", "watch")),
)
# Services the operator renders carry this label, and EndpointSlices copy their Service's.
SLICE_SELECTOR = "app.kubernetes.io/part-of=packetflow"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
GRPC_PORT_NAME = "grpc"
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
WATCH_SECONDS = 300  # the API server ends a watch after this; it is then resumed
RETRY_SECONDS = 1.0
RETRY_SECONDS_MAX = 30.0
COALESCE_SECONDS = 0.05  # events arriving together make one routes snapshot
# Routes wait until every collection was listed once, but no longer than this: a resource the
# gateway may not read (RBAC) must not keep the others from being served.
SYNC_WAIT_SECONDS = 15.0

Objects = Mapping[tuple[str, str], Mapping[str, Any]]  # (namespace, name) -> object


# ------------------------------------------------------------------ pure: objects -> routes


def slice_addresses(slices: Iterable[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(pod name, ``ip:port``) of every ready endpoint of these slices, on port ``grpc``."""
    found: dict[str, str] = {}
    for item in slices:
        ports = item.get("ports") or []
        port = next((p.get("port") for p in ports if p.get("name") == GRPC_PORT_NAME), None)
        if port is None and len(ports) == 1:
            port = ports[0].get("port")
        if port is None:
            continue
        for endpoint in item.get("endpoints") or []:
            if (endpoint.get("conditions") or {}).get("ready") is False:
                continue  # absent means ready (discovery.k8s.io/v1)
            addresses = endpoint.get("addresses") or []
            if not addresses:
                continue
            ip = addresses[0]
            address = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
            pod = (endpoint.get("targetRef") or {}).get("name") or address
            found[address] = pod
    return sorted((pod, address) for address, pod in found.items())


def routes_from(capabilities: Objects, actors: Objects, slices: Objects) -> Routes:
    """The routes the cluster's objects describe (invalid specs are skipped: the operator
    reports them)."""
    by_service: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for (namespace, _), item in slices.items():
        service = ((item.get("metadata") or {}).get("labels") or {}).get(SERVICE_NAME_LABEL)
        if service:
            by_service.setdefault((namespace, service), []).append(item)

    def addresses(namespace: str, service: str) -> tuple[str, ...]:
        return tuple(a for _, a in slice_addresses(by_service.get((namespace, service), [])))

    homes: dict[str, list[str]] = {}
    capability_routes: dict[str, CapabilityBackends] = {}
    actor_routes: dict[str, ActorBackends] = {}
    for (namespace, name), item in sorted(capabilities.items()):
        try:
            capability = Capability.model_validate(item)
        except ValidationError:
            continue
        spec = capability.spec
        homes.setdefault(name, []).append(namespace)
        canary = spec.canary
        capability_routes[name] = CapabilityBackends(
            name, addresses(namespace, name),
            # Without spec.canary a leftover canary workload gets no calls.
            addresses(namespace, name + CANARY_SUFFIX) if canary is not None else (),
            canary.weight if canary is not None else 0, spec.traffic,
            tuple(spec.effects), spec.intent, spec.implementation.kind,
            f"{namespace}/{workload_service_account(name)}")
    for (namespace, name), item in sorted(actors.items()):
        try:
            Actor.model_validate(item)
        except ValidationError:
            continue
        homes.setdefault(name, []).append(namespace)
        actor_routes[name] = ActorBackends(
            name, tuple(slice_addresses(by_service.get((namespace, name), []))),
            f"{namespace}/{workload_service_account(name)}")
    problems = {name: f"the name is used in namespaces {', '.join(sorted(spaces))} (or by a "
                      "Capability and an Actor); a gateway serves each name once"
                for name, spaces in homes.items() if len(spaces) > 1}
    for name in problems:
        capability_routes.pop(name, None)
        actor_routes.pop(name, None)
    return Routes(capability_routes, actor_routes, problems)


# ------------------------------------------------------------------ the API client


@dataclass(frozen=True)
class Resource:
    """A resource to list and watch: its API path prefix and plural."""

    api: str  # "/apis/packetflow.io/v1alpha1"
    plural: str
    selector: str | None = None

    def path(self, namespace: str | None) -> str:
        """The collection's path, in a namespace or across all."""
        if namespace is None:
            return f"{self.api}/{self.plural}"
        return f"{self.api}/namespaces/{namespace}/{self.plural}"


CAPABILITIES = Resource(f"/apis/{GROUP}/{VERSION}", "capabilities")
ACTORS = Resource(f"/apis/{GROUP}/{VERSION}", "actors")
ENDPOINT_SLICES = Resource("/apis/discovery.k8s.io/v1", "endpointslices", SLICE_SELECTOR)


class Gone(Exception):
    """The watch's resourceVersion is too old: list again."""


class KubeApi:
    """List and watch over HTTP, with the service account's credentials in a pod."""

    def __init__(self, base_url: str, token_file: Path | None = None,
                 ca_file: Path | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token_file = token_file
        verify: Any = str(ca_file) if ca_file is not None and ca_file.exists() else True
        self.client = httpx.AsyncClient(base_url=self.base_url, verify=verify,
                                        timeout=httpx.Timeout(30.0, read=WATCH_SECONDS + 30))

    @classmethod
    def in_cluster(cls) -> KubeApi:
        """The API server a pod reaches, as its service account."""
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise RuntimeError("not in a Kubernetes pod (KUBERNETES_SERVICE_HOST is unset); "
                               "set PACKETFLOW_GATEWAY_KUBE_API")
        host = f"[{host}]" if ":" in host else host
        return cls(f"https://{host}:{port}", SERVICE_ACCOUNT / "token",
                   SERVICE_ACCOUNT / "ca.crt")

    def _headers(self) -> dict[str, str]:
        if self.token_file is None or not self.token_file.exists():
            return {}
        return {"Authorization": f"Bearer {self.token_file.read_text().strip()}"}

    async def list(self, resource: Resource, namespace: str | None
                   ) -> tuple[list[dict[str, Any]], str]:
        """Every object and the collection's resourceVersion."""
        params = {"labelSelector": resource.selector} if resource.selector else {}
        response = await self.client.get(resource.path(namespace), params=params,
                                         headers=self._headers())
        response.raise_for_status()
        body = orjson.loads(response.content)
        return list(body.get("items") or []), str((body.get("metadata") or {})
                                                  .get("resourceVersion") or "")

    async def watch(self, resource: Resource, namespace: str | None,
                    version: str) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Events (type, object) after ``version`` until the server ends the watch."""
        params: dict[str, str] = {"watch": "true", "allowWatchBookmarks": "true",
                                  "timeoutSeconds": str(WATCH_SECONDS)}
        if version:
            params["resourceVersion"] = version
        if resource.selector:
            params["labelSelector"] = resource.selector
        async with self.client.stream("GET", resource.path(namespace), params=params,
                                      headers=self._headers()) as response:
            if response.status_code == 410:
                raise Gone()
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                event = orjson.loads(line)
                kind, item = event.get("type", ""), event.get("object") or {}
                if kind == "ERROR":
                    if item.get("code") == 410:
                        raise Gone()
                    raise httpx.HTTPError(f"watch error: {item.get('message')}")
                yield kind, item

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self.client.aclose()


# ------------------------------------------------------------------ discovery


@dataclass
class KubeDiscovery:
    """Watches the three resources in each namespace (or all) and applies each snapshot."""

    api: KubeApi
    namespaces: list[str] = field(default_factory=list)
    sync_wait: float = SYNC_WAIT_SECONDS
    objects: dict[Resource, dict[tuple[str, str], dict[str, Any]]] = field(
        default_factory=lambda: {CAPABILITIES: {}, ACTORS: {}, ENDPOINT_SLICES: {}})
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _synced: set[tuple[Resource, str | None]] = field(default_factory=set)

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> KubeDiscovery:
        """The API from settings (a URL, else in-cluster) and the namespaces to serve."""
        api = KubeApi(settings.gateway_kube_api) if settings.gateway_kube_api \
            else KubeApi.in_cluster()
        return cls(api, list(settings.gateway_namespaces))

    def routes(self) -> Routes:
        """The current snapshot."""
        return routes_from(self.objects[CAPABILITIES], self.objects[ACTORS],
                           self.objects[ENDPOINT_SLICES])

    async def run(self, apply: Callable[[Routes], None]) -> None:
        """Watch until cancelled; ``apply`` each snapshot, the first once every collection
        was listed (or ``sync_wait`` seconds passed)."""
        scopes: list[str | None] = list(self.namespaces) or [None]
        watchers = [asyncio.create_task(self._watch(resource, namespace))
                    for resource in self.objects for namespace in scopes]
        expected = {(resource, namespace) for resource in self.objects for namespace in scopes}
        loop = asyncio.get_running_loop()
        listing: float | None = loop.time() + self.sync_wait  # None once serving
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(listing):
                        await self._changed.wait()
                await asyncio.sleep(COALESCE_SECONDS)
                self._changed.clear()
                if listing is not None:
                    missing = expected - self._synced
                    if missing and loop.time() < listing:
                        continue
                    if missing:
                        log.warning("serving without %s: not listed (see earlier warnings)",
                                    ", ".join(sorted({r.plural for r, _ in missing})))
                    listing = None
                apply(self.routes())
        finally:
            for watcher in watchers:
                watcher.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
            await self.api.aclose()

    async def _watch(self, resource: Resource, namespace: str | None) -> None:
        store = self.objects[resource]
        delay = RETRY_SECONDS
        version = ""
        while True:
            try:
                if not version:
                    items, version = await self.api.list(resource, namespace)
                    for key in [k for k in store if namespace in (None, k[0])]:
                        del store[key]
                    for item in items:
                        store[_key(item)] = item
                    self._synced.add((resource, namespace))
                    self._changed.set()
                async for kind, item in self.api.watch(resource, namespace, version):
                    version = str((item.get("metadata") or {}).get("resourceVersion")
                                  or version)
                    if kind == "BOOKMARK":
                        continue
                    if kind == "DELETED":
                        store.pop(_key(item), None)
                    else:
                        store[_key(item)] = item
                    self._changed.set()
                delay = RETRY_SECONDS
            except Gone:
                version = ""
            except (httpx.HTTPError, OSError, ValueError) as exc:
                log.warning("watching %s failed (%s); retrying in %.0fs", resource.plural, exc,
                            delay, extra={"namespace": namespace or "*"})
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_SECONDS_MAX)
                version = ""


def _key(item: Mapping[str, Any]) -> tuple[str, str]:
    metadata = item.get("metadata") or {}
    return str(metadata.get("namespace") or ""), str(metadata.get("name") or "")
