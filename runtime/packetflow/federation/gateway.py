"""The federation gateway: one process per organization between its capabilities and its
peers' gateways.

Inbound (a peer calls us): :class:`packetflow.identity.terminator.MtlsTerminator`
authenticates each TLS 1.3 connection by its certificate and hands it to the data path
(:mod:`packetflow.federation.datapath`), which checks every call before anything reaches the
local capability. Outbound (a local caller uses an import): the data path again, on one
reused mTLS connection per peer. This module holds what the calls are checked against: the
configuration (reloaded live), peer links and their catalogs, imports and their pinned
contracts, trust, SLA meters, the audit log, status; catalogs travel over ``grpc.aio``.
Every call and every refusal in both directions is appended to the audit log before the
caller hears back.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc
import orjson

from packetflow.addresses import split_address
from packetflow.client import CallError
from packetflow.composition.remote import RemoteCaller
from packetflow.errors import (
    CapabilityNotFound,
    Code,
    PacketFlowError,
    Unauthenticated,
)
from packetflow.federation import trust as dims
from packetflow.federation.audit import ALLOW, DENY, INBOUND, OUTBOUND, AuditRecord
from packetflow.federation.catalog import (
    CatalogEntry,
    LocalCapability,
    catalog_for,
    catalog_version,
    check_compatible,
    contract_from_schema,
)
from packetflow.federation.datapath import (
    MAX_MESSAGE_BYTES,
    CallRecord,
    ExportStats,
    LocalCalls,
    PeerCalls,
    Refused,
    not_servable,
    trace_of,
)
from packetflow.federation.links import ImportState, Inbound, PeerLink
from packetflow.federation.observe import FederationMetrics, start_http
from packetflow.federation.ratelimit import TokenBucket
from packetflow.federation.sla import SlaMeter, SlaReport
from packetflow.federation.state import GatewayState, check_identity, watch_state
from packetflow.federation.store import AuditUnavailable, FederationStore
from packetflow.federation.trust import Evidence, TrustBook
from packetflow.gateway.upstream import ConnectFailed, FixedTls, Upstream
from packetflow.identity.terminator import MtlsTerminator, Refusal
from packetflow.identity.tls import channel_credentials, client_context
from packetflow.identity.x509 import AuthenticationError, authenticate
from packetflow.keepalive import SERVER_KEEPALIVE
from packetflow.rpc import SERVICE_NAME, abort_for
from packetflow.spec import FederationImport, duration_seconds
from packetflow.v1 import federation_pb2, federation_pb2_grpc, runtime_pb2, runtime_pb2_grpc

log = logging.getLogger("packetflow.federation")

CATALOG_VERSION_KEY = "packetflow-catalog-version"
CATALOG_TIMEOUT = 5.0
CHANNEL_GRACE = 30.0  # a replaced channel's calls in flight may finish within this
STATUS_SECONDS = 1.0
TRUST_SAVE_SECONDS = 10.0
PRUNE_SECONDS = 3600.0
STOP_SECONDS = 10.0  # what one step of stopping may take before it is given up


def _utc(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


class Gateway:
    """A running federation gateway (see the module docstring)."""

    def __init__(self, config_path: Path) -> None:
        self.watch = watch_state(config_path)
        state = self.watch.value
        self.watch.interval = state.settings.reload_seconds
        self.metrics = FederationMetrics()
        self.trust = TrustBook(state.trust)
        self.remote = RemoteCaller(options=[("grpc.max_receive_message_length",
                                             MAX_MESSAGE_BYTES)])
        # Zero trust inside the cluster: every connection to local runtimes presents this
        # (rotating) workload certificate, as `packetflow gateway` does; never the federation
        # identity, which is for peers only. BundleError names the file at fault.
        self.workload = state.settings.workload.workload_identity(state.config_path.parent)
        if self.workload is not None:
            self.remote.secure(self.workload)
        self.local_errors: dict[str, str] = {}  # why an export's runtime did not answer
        self.links: dict[str, PeerLink] = {}
        self.imports: dict[str, ImportState] = {}
        # peer/capability references (hand-written federated capabilities), per catalog.
        self._references: dict[tuple[str, str], ImportState] = {}
        self.local: dict[str, LocalCapability] = {}
        self.buckets: dict[tuple[str, str], TokenBucket] = {}
        self.meters: dict[tuple[str, str, str], SlaMeter] = {}
        self.export_stats: dict[str, ExportStats] = {}
        self.store: FederationStore | None = None
        self.peer_calls = PeerCalls(self)
        self.terminator: MtlsTerminator[Inbound] = MtlsTerminator(
            context=lambda: self.current().server_context, authenticate=self._authenticate,
            on_refused=self._refused_connection, serve=self.peer_calls.serve,
            on_accepted=self._accepted)
        self.refused_connections = 0
        self.status_json = b"{}"
        self.peer_port = 0
        self.local_port = 0
        self.health_port: int | None = None
        self.http_port: int | None = None
        self._servers: list[grpc.aio.Server] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._http: Any = None
        self._socket_dir: tempfile.TemporaryDirectory[str] | None = None
        self._local_server: asyncio.Server | None = None
        self.local_calls: LocalCalls | None = None
        self._generation = self.watch.generation
        self._apply(state)
        self.metrics.gauges(self._gauges)

    # ------------------------------------------------------------------ state and reload

    def current(self) -> GatewayState:
        """The state new work uses (reloaded if its files changed)."""
        state = self.watch.get()
        if self.watch.generation != self._generation:
            self._generation = self.watch.generation
            self._apply(state)
        return state

    def _apply(self, state: GatewayState) -> None:
        """Bring links, imports and limits in line with a (new) state."""
        self.trust.params = state.trust
        for name in list(self.links):
            if name not in state.peers:
                link = self.links.pop(name)
                self._retire(link.channel)
                if link.upstream is not None:
                    link.upstream.retire()
        for name in state.peers:
            self.links.setdefault(name, PeerLink(name))
        kept = {}
        for local_name, spec in state.imports.items():
            old = self.imports.get(local_name)
            kept[local_name] = old if old is not None and old.spec == spec else ImportState(spec)
        self.imports = kept
        for peer in self.links:
            self._recheck_imports(peer)
        # A bucket stays while its export still limits that peer the same way.
        self.buckets = {key: bucket for key, bucket in self.buckets.items()
                        if (export := state.exports.get(key[1])) is not None
                        and export.rate_limit is not None and key[0] in export.to
                        and TokenBucket.of(export.rate_limit, 0.0).same_limit(bucket)}
        log.info("federation state loaded", extra={"generation": self.watch.generation,
                                                   "peers": len(state.peers)})

    def _retire(self, channel: grpc.aio.Channel | None) -> None:
        """Close a replaced channel once its calls in flight are done (or after the grace)."""
        if channel is not None:
            self._spawn(channel.close(grace=CHANNEL_GRACE))

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open the audit log, bind every listener, start the loops."""
        state = self.current()
        settings = state.settings
        base = state.config_path.parent
        state_dir = settings.state_dir if settings.state_dir.is_absolute() \
            else base / settings.state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        self.store = await FederationStore.open(state.spec.audit, state_dir,
                                                settings.audit_dsn)
        saved = await self.store.get_state("trust")
        for key, evidence in (saved or {}).items():
            peer, _, dimension = key.partition("|")
            self.trust.evidence[(peer, dimension)] = Evidence.from_json(evidence)
        host, _, port = settings.listen.rpartition(":")
        self.peer_port = await self.terminator.start(host.strip("[]"), int(port))
        self.local_port = await self._start_local(settings.local, settings.workload.health_address)
        if settings.metrics_address:
            self._http, self.http_port = start_http(settings.metrics_address,
                                                    self.metrics.registry,
                                                    lambda: self.status_json)
        await self.refresh_local()
        loops = [(self._reload_loop, settings.reload_seconds),
                 (self._catalog_loop, settings.catalog_refresh_seconds),
                 (self._local_loop, settings.catalog_refresh_seconds),
                 (self._status_loop, STATUS_SECONDS),
                 (self._trust_save_loop, TRUST_SAVE_SECONDS),
                 (self._prune_loop, PRUNE_SECONDS)]
        self._tasks = [asyncio.get_running_loop().create_task(self._every(loop, seconds))
                       for loop, seconds in loops]
        self._tasks.append(asyncio.get_running_loop().create_task(self._probe_loop()))
        self._update_status()

    async def _start_local(self, address: str, health_address: str | None) -> int:
        # Imported here: health is needed only once the local side starts.
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        from grpc_health.v1._async import HealthServicer

        from packetflow.health import plaintext_health_server

        server = grpc.aio.server(options=_server_options())
        # Methods LocalServicer leaves out (Feedback, Plan...) answer UNIMPLEMENTED, as the
        # generated base class does; its stubs only declare them abstract.
        runtime_pb2_grpc.add_CapabilityRuntimeServicer_to_server(
            LocalServicer(self), server)  # type: ignore[abstract]
        health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        # The gRPC server sits behind the data path (Invoke is served there) on a Unix
        # socket in a directory only our user can enter.
        self._socket_dir = tempfile.TemporaryDirectory(prefix="packetflow-federation-")
        inner = os.path.join(self._socket_dir.name, "local.sock")
        server.add_insecure_port(f"unix:{inner}")
        self._servers.append(server)  # stopped by stop() even if what follows fails
        await server.start()
        for service in ("", SERVICE_NAME):
            await health.set(service, health_pb2.HealthCheckResponse.SERVING)
        if health_address is not None:  # the kubelet's probes, beside mTLS towards runtimes
            health_server, self.health_port = await plaintext_health_server(health,
                                                                            health_address)
            self._servers.append(health_server)
        self.local_calls = LocalCalls(self, Upstream(f"unix:{inner}"))
        host, port = split_address(address)
        self._local_server = await asyncio.get_running_loop().create_server(
            self.local_calls.serve, host, port, reuse_address=True)
        sockets = self._local_server.sockets
        return int(sockets[0].getsockname()[1]) if sockets else port

    async def stop(self, grace: float = 5.0) -> None:
        """Stop listening, let calls finish, save trust, close the log. Also after a start
        that failed half way; every server started is stopped even if a step before fails,
        and no task that ignores its cancellation holds the stop."""
        try:
            await _cancelled(self._tasks)
            try:
                await asyncio.wait_for(self.terminator.stop(), STOP_SECONDS)
            except TimeoutError:
                log.warning("the federation gateway's TLS listener did not stop in %gs",
                            STOP_SECONDS)
            await self.peer_calls.aclose()
            if self._local_server is not None:
                self._local_server.close()
            if self.local_calls is not None:
                await self.local_calls.aclose()
        finally:
            for server in self._servers:
                await server.stop(grace)
        for link in self.links.values():
            if link.channel is not None:
                await link.channel.close()
            if link.upstream is not None:
                await link.upstream.aclose()
        await _cancelled(self._background)
        await self.remote.close()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self.store is not None:
            await self._save_trust()
            await self.store.aclose()
        if self._socket_dir is not None:
            self._socket_dir.cleanup()

    async def _every(self, work: Any, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await work()
            except Exception:  # one failed round must not end the loop
                log.exception("federation loop %s failed", getattr(work, "__name__", work))

    async def _reload_loop(self) -> None:
        self.current()

    # ------------------------------------------------------------------ audit

    async def audit(self, record: AuditRecord) -> None:
        """Append ``record`` (the caller waits: no reply leaves before its record is in)."""
        assert self.store is not None
        await self.store.append(record)

    def audit_writable(self) -> None:
        """Unavailable while the audit log cannot be written: nothing runs unaudited (the
        next refusal's record tries the log again)."""
        if self.store is not None and self.store.failing is not None:
            raise AuditUnavailable(self.store.failing)

    # ------------------------------------------------------------------ inbound: handshakes

    def _authenticate(self, der: bytes | None) -> Inbound:
        """The terminator's check of a client certificate: the bundle of the trust domain its
        SPIFFE ID names, and only that one."""
        state = self.current()
        if der is None:
            raise AuthenticationError("no-client-certificate",
                                      "the client presented no certificate")
        certificate = authenticate(der, state.bundles, datetime.datetime.now(datetime.UTC))
        peer = state.peer_by_domain[certificate.spiffe_id.trust_domain]
        return Inbound(peer.name, certificate, "")

    def _accepted(self, connection: Any) -> None:
        identity: Inbound = connection.identity
        connection.identity = Inbound(identity.peer, identity.certificate, connection.address)
        link = self.links.get(identity.peer)
        if link is not None:
            link.inbound_handshake = time.time()
            link.inbound_expiry = identity.certificate.not_after.timestamp()

    def _refused_connection(self, refusal: Refusal) -> None:
        """Audit a refused connection; attribute it to a peer when its certificate names one
        of our peers' trust domains and failed only on time (anyone can claim a domain)."""
        self.refused_connections += 1
        peer, fingerprint = "", ""
        if refusal.certificate_der is not None:
            from cryptography import x509

            from packetflow.identity.x509 import fingerprint as fingerprint_of
            from packetflow.identity.x509 import spiffe_ids

            try:
                certificate = x509.load_der_x509_certificate(refusal.certificate_der)
            except ValueError:
                certificate = None
            if certificate is not None:
                fingerprint = fingerprint_of(certificate)
                ids = spiffe_ids(certificate)
                domain = ids[0].removeprefix("spiffe://").split("/")[0] if ids else ""
                found = self.current().peer_by_domain.get(domain)
                if found is not None and refusal.reason in ("expired", "not-yet-valid"):
                    peer = found.name
                    self.trust.observe(peer, dims.SECURITY, False, time.time())
        self.metrics.refusals.labels(INBOUND, peer, refusal.reason).inc()
        log.warning("connection refused", extra={"address": refusal.address,
                                                  "reason": refusal.reason,
                                                  "detail": refusal.message})
        self._spawn(self.audit(AuditRecord(
            at=time.time(), direction=INBOUND, peer=peer, fingerprint=fingerprint,
            capability="", decision=DENY, reason=f"{refusal.reason}: {refusal.message}",
            code=Code.UNAUTHENTICATED.value, address=refusal.address)))

    # ------------------------------------------------------------------ inbound: calls

    def check_connection(self, identity: Inbound, state: GatewayState) -> None:
        """A call's connection is still trusted now, or Unauthenticated."""
        certificate = identity.certificate
        try:
            check_identity(state, identity.peer, certificate.authority,
                           certificate.not_after, datetime.datetime.now(datetime.UTC))
        except AuthenticationError as exc:
            raise Refused(Unauthenticated(exc.message), exc.reason) from None

    async def serve_catalog(self, identity: Inbound,
                            known_version: str) -> federation_pb2.Catalog:
        """A peer reads the catalog of what is exported to it."""
        state = self.current()
        try:
            self.check_connection(identity, state)
        except Refused as refused:
            await self.peer_calls.refuse_call(refused, CallRecord(
                time.perf_counter(), at=time.time(), direction=INBOUND, peer="",
                fingerprint="", capability=""))
        entries = catalog_for(state.spec, identity.peer, self.local)
        version = catalog_version(entries)
        if version == known_version:
            return federation_pb2.Catalog(version=version, unchanged=True,
                                          organization=state.spec.organization)
        await self.audit(AuditRecord(
            at=time.time(), direction=INBOUND, peer=identity.peer,
            fingerprint=identity.certificate.fingerprint, capability="", decision=ALLOW,
            reason=f"catalog {version}: {len(entries)} exports", code=Code.OK.value,
            address=identity.address))
        return federation_pb2.Catalog(
            version=version, organization=state.spec.organization,
            entries_json=orjson.dumps([entry.to_json() for entry in entries]))

    # ------------------------------------------------------------------ local capabilities

    async def refresh_local(self, only: str | None = None) -> LocalCapability | None:
        """Describe the exported capabilities at the local runtime (their contracts go into
        catalogs and guard every inbound call); returns ``only``'s description."""
        state = self.current()
        names = [only] if only is not None else list(state.exports)
        for name in names:
            try:
                target = await self.remote.resolver.resolve(state.settings.runtime or name)
                described = await asyncio.wait_for(self.remote.client(target).describe(name),
                                                   CATALOG_TIMEOUT)
                self.local[name] = LocalCapability(
                    name, described["intent"], contract_from_schema(described["requires"]),
                    contract_from_schema(described["provides"]),
                    float(described["timeoutSeconds"]))
            except (CallError, TimeoutError, OSError, ValueError) as exc:
                self.local_errors[name] = exc.code.name if isinstance(exc, CallError) \
                    else type(exc).__name__
                if self.local.pop(name, None) is not None or only is not None:
                    log.warning("exported capability %s is not reachable: %s", name, exc)
        for name in list(self.local):
            if name not in state.exports:
                del self.local[name]
        return self.local.get(only) if only is not None else None

    async def _local_loop(self) -> None:
        await self.refresh_local()

    # ------------------------------------------------------------------ outbound

    def _link_key(self, state: GatewayState, name: str) -> tuple[Any, ...]:
        peer = state.peers[name]
        return (state.credentials.fingerprint, state.bundles[peer.trust_domain].fingerprints,
                peer.endpoint)

    def stub(self, link: PeerLink, state: GatewayState) -> federation_pb2_grpc.FederationStub:
        """The peer's stub on its reused channel; a new channel (new handshakes) when our
        certificate, the peer's bundle or its endpoint changed."""
        key = self._link_key(state, link.name)
        if link.stub is None or link.key != key:
            self._retire(link.channel)
            peer = state.peers[link.name]
            link.channel = grpc.aio.secure_channel(
                peer.endpoint, channel_credentials(
                    state.credentials, state.bundles[peer.trust_domain].pem()),
                options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                         ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
            link.stub = federation_pb2_grpc.FederationStub(link.channel)
            link.key = key
        return link.stub

    def peer_upstream(self, link: PeerLink, state: GatewayState) -> Upstream:
        """The data path's reused mTLS connection to the peer; a new one (new handshakes,
        the old one drains) when our certificate, the peer's bundle or its endpoint
        changed."""
        key = self._link_key(state, link.name)
        if link.upstream is None or link.upstream_key != key:
            if link.upstream is not None:
                link.upstream.retire()
            peer = state.peers[link.name]
            link.upstream = Upstream(peer.endpoint, FixedTls(client_context(
                state.credentials, state.bundles[peer.trust_domain].pem())))
            link.upstream_key = key
        return link.upstream

    async def check_server(self, link: PeerLink, state: GatewayState) -> None:
        """Handshake with the peer once per channel material and check its server's SPIFFE
        ID against its bundle (gRPC's client checks the chain and the host name only)."""
        peer = state.peers[link.name]
        bundle = state.bundles[peer.trust_domain]
        host, _, port = peer.endpoint.rpartition(":")
        link.checked_key = link.key
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(
                host.strip("[]"), int(port), ssl=client_context(state.credentials,
                                                                 bundle.pem())),
                CATALOG_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            link.checked_key = None  # unreachable is not a verdict: try again next round
            link.error = f"cannot reach {peer.endpoint}: {exc}"
            return
        try:
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            found = authenticate(der, {peer.trust_domain: bundle},
                                 datetime.datetime.now(datetime.UTC))
            if found.spiffe_id.trust_domain != peer.trust_domain:  # pragma: no cover
                raise AuthenticationError("wrong-trust-domain", f"{found.spiffe_id}")
            link.identity_error = None
            link.fingerprint = found.fingerprint
            link.last_handshake = time.time()
            link.certificate_expiry = found.not_after.timestamp()
        except AuthenticationError as exc:
            link.identity_error = f"{peer.endpoint} is not {peer.name}: {exc.message}"
            self.trust.observe(link.name, dims.SECURITY, False, time.time())
            self.metrics.refusals.labels(OUTBOUND, link.name, exc.reason).inc()
            await self.audit(AuditRecord(
                at=time.time(), direction=OUTBOUND, peer=link.name, fingerprint="",
                capability="", decision=DENY, reason=f"{exc.reason}: {exc.message}",
                code=Code.UNAUTHENTICATED.value, address=peer.endpoint))
        finally:
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()

    async def refresh_catalog(self, link: PeerLink) -> None:
        """Read the peer's catalog (when it changed) and re-check our imports against it."""
        state = self.current()
        if link.name not in state.peers:
            return
        stub = self.stub(link, state)
        if link.checked_key != link.key:
            await self.check_server(link, state)
        try:
            reply = await stub.GetCatalog(federation_pb2.CatalogRequest(
                known_version=link.version), timeout=CATALOG_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            link.connected = False
            link.error = f"{exc.code().name}: {exc.details()}"
            return
        link.connected, link.last_catalog, link.error = True, time.time(), None
        upstream = self.peer_upstream(link, state)
        if upstream.conn is None:
            self._spawn(_warm(upstream))  # the first call need not wait for a handshake
        if reply.unchanged:
            return
        try:
            entries = [CatalogEntry.from_json(e) for e in orjson.loads(reply.entries_json)]
        except (ValueError, KeyError, TypeError) as exc:
            self.trust.observe(link.name, dims.SECURITY, False, time.time())
            link.error = f"malformed catalog: {exc}"
            return
        link.catalog = {entry.capability: entry for entry in entries}
        link.version, link.organization = reply.version, reply.organization
        self._recheck_imports(link.name)
        if self.store is not None:
            # `federation usage` prices imports by the terms their exporter published.
            await self.store.put_state("catalogs", {
                name: {cap: entry.to_json()["pricing"] for cap, entry in other.catalog.items()
                       if entry.pricing is not None}
                for name, other in self.links.items()})
        log.info("catalog of %s: version %s, %d entries", link.name, reply.version,
                 len(entries))

    async def _catalog_loop(self) -> None:
        await asyncio.gather(*(self.refresh_catalog(link) for link in list(self.links.values())))

    def _recheck_imports(self, peer: str) -> None:
        """Check each import of ``peer`` against its current catalog (the first one seen
        pins the contract local callers are checked against)."""
        link = self.links.get(peer)
        catalog = link.catalog if link is not None else {}
        for imported in self.imports.values():
            if imported.spec.peer != peer or (link is not None and not link.version):
                continue
            entry = catalog.get(imported.spec.capability)
            if entry is None:
                imported.problem = (f"{peer} does not export {imported.spec.capability!r} to "
                                    f"{self.current().spec.organization}")
                continue
            if imported.entry is None:
                imported.pin(entry)
                continue
            problems = check_compatible(imported.entry.requires, imported.entry.provides,
                                        entry.requires, entry.provides)
            imported.problem = None if not problems else (
                f"{peer} changed the contract of {imported.spec.capability!r} incompatibly: "
                + "; ".join(f"{path}: {message}" for path, message in problems))
            if not problems:
                # Terms (SLA, pricing) follow the peer; the checked contract stays pinned.
                imported.entry = CatalogEntry(
                    imported.entry.capability, entry.intent, imported.entry.requires,
                    imported.entry.provides, entry.timeout_seconds, entry.sla, entry.pricing,
                    entry.rate_limit)

    def catalog_metadata(self, name: str) -> tuple[tuple[str, str], ...]:
        """The catalog version an import's answer was checked against, as metadata."""
        with contextlib.suppress(PacketFlowError):
            _, link = self.resolve_import(name)
            return ((CATALOG_VERSION_KEY, link.version),)
        return ()

    def resolve_import(self, name: str) -> tuple[ImportState, PeerLink]:
        """An import by its local name, or ``peer/capability`` (a hand-written federated
        capability): the latter checked against the peer's current catalog each time."""
        found = self.imports.get(name)
        if found is None and "/" in name:
            peer, _, capability = name.partition("/")
            link_ = self.links.get(peer)
            if link_ is not None:
                found = self._references.get((name, link_.version))
                if found is None:
                    found = ImportState(FederationImport(peer=peer, capability=capability))
                    entry = link_.catalog.get(capability)
                    if entry is not None:
                        found.pin(entry)
                    elif link_.version:
                        found.problem = f"{peer} does not export {capability!r} to us"
                    if link_.version:  # compiled once per catalog version
                        if len(self._references) > 1000:
                            self._references.clear()
                        self._references[(name, link_.version)] = found
        if found is None:
            raise CapabilityNotFound(name)
        return found, self.links[found.spec.peer]

    async def _probe_loop(self) -> None:
        """Call each import's SLA probe on its period, whatever the real traffic."""
        due: dict[str, float] = {}
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for name, imported in list(self.imports.items()):
                entry = imported.entry
                if entry is None or entry.sla is None or entry.sla.probe is None \
                        or imported.problem is not None:
                    continue
                if due.setdefault(name, now) > now:
                    continue
                due[name] = now + duration_seconds(entry.sla.probe.every)
                self._spawn(self._probe(name, orjson.dumps(entry.sla.probe.input)))

    async def _probe(self, name: str, payload: bytes) -> None:
        with contextlib.suppress(PacketFlowError):
            assert self.local_calls is not None
            await self.local_calls.invoke_import(name, payload, os.urandom(16).hex(),
                                                 CATALOG_TIMEOUT,
                                     probe=True)

    # ------------------------------------------------------------------ SLA, status, upkeep

    def meter(self, side: str, peer: str, capability: str, sla: Any) -> SlaMeter:
        key = (side, peer, capability)
        meter = self.meters.get(key)
        if meter is None or meter.sla != sla:
            meter = self.meters[key] = SlaMeter(sla)
        return meter

    def close_sla_windows(self, now: float) -> list[tuple[tuple[str, str, str], SlaReport]]:
        """Judge every window that ended by ``now``; breaches are counted and logged."""
        closed = []
        for key, meter in self.meters.items():
            report = meter.close(now)
            if report is None:
                continue
            closed.append((key, report))
            if report.breaches:
                side, peer, capability = key
                self.metrics.sla_breaches.labels(side, peer, capability).inc()
                stats = self.export_stats.get(capability) if side == "exporter" else None
                if stats is not None:
                    stats.sla_breaches += 1
                    stats.by_peer.setdefault(peer, {"calls": 0, "errors": 0,
                                                    "slaBreaches": 0})["slaBreaches"] += 1
                log.warning("SLA breached", extra={"side": side, "peer": peer,
                                                   "capability": capability,
                                                   "breaches": list(report.breaches)})
        return closed

    async def _status_loop(self) -> None:
        self.close_sla_windows(time.time())
        self._update_status()

    def _update_status(self) -> None:
        self.status_json = orjson.dumps(self.status())

    def status(self) -> dict[str, Any]:
        """Everything the Federation's status shows, as plain data."""
        state = self.watch.value
        now = time.time()
        peers = []
        for name, peer in state.peers.items():
            link = self.links.get(name) or PeerLink(name)
            dimension, lowest = self.trust.lowest(name, now)
            expiries = [e for e in (link.certificate_expiry, link.inbound_expiry) if e]
            peers.append({
                "name": name, "organization": peer.organization,
                "trustDomain": peer.trust_domain, "connected": link.connected,
                "lastHandshake": _utc(max(filter(None, (link.last_handshake,
                                                        link.inbound_handshake)),
                                          default=None)),
                "certificateExpiry": _utc(min(expiries) if expiries else None),
                "catalogVersion": link.version, "lastCatalog": _utc(link.last_catalog),
                "error": link.identity_error or link.error,
                "trust": self.trust.explain(name, now),
                "lowestTrust": {"dimension": dimension, "score": round(lowest, 4)},
                "refused": self.trust.refusal(name, now),
            })
        exports = []
        for capability, export in state.exports.items():
            stats = self.export_stats.get(capability, ExportStats())
            exports.append({"capability": capability, "to": list(export.to),
                            "available": capability in self.local, "calls": stats.calls,
                            "errors": stats.errors, "slaBreaches": stats.sla_breaches,
                            "byPeer": stats.by_peer})
        imports = [{"name": name, "peer": i.spec.peer, "capability": i.spec.capability,
                    "ready": i.problem is None, "problem": i.problem,
                    "slaBreaches": m.breaches if (m := self.meters.get(
                        ("importer", i.spec.peer, i.spec.capability))) else 0}
                   for name, i in self.imports.items()]
        head = self.store.head if self.store is not None else None
        credentials = state.credentials
        return {
            "name": state.settings.name, "organization": state.spec.organization,
            "trustDomain": state.spec.trust_domain,
            "identity": {"spiffeId": str(credentials.spiffe_id),
                         "fingerprint": credentials.fingerprint,
                         "certificateExpiry": _utc(
                             credentials.leaf.not_valid_after_utc.timestamp())},
            "peers": peers, "exports": exports, "imports": imports,
            "audit": {"headHash": head.hash if head else None,
                      "records": head.seq if head else 0},
            "connections": len(self.terminator.connections),
            "handshakes": self.terminator.handshakes,
            "refusedConnections": self.refused_connections,
            "reloadError": self.watch.error,
        }

    def _gauges(self) -> Iterable[tuple[str, str, dict[str, str], float]]:
        now = time.time()
        for (peer, dimension), _ in list(self.trust.items()):
            yield ("packetflow_federation_trust_score", "Trust score per peer and dimension.",
                   {"peer": peer, "dimension": dimension},
                   self.trust.score(peer, dimension, now))
        for name, link in list(self.links.items()):
            yield ("packetflow_federation_peer_connected", "1 while the peer's catalog "
                   "reads succeed.", {"peer": name}, float(link.connected))
        yield ("packetflow_federation_connections", "Open inbound mTLS connections.", {},
               float(len(self.terminator.connections)))
        yield ("packetflow_federation_handshakes", "Accepted inbound TLS handshakes.", {},
               float(self.terminator.handshakes))

    async def _save_trust(self) -> None:
        if self.store is not None:
            await self.store.put_state("trust", {f"{peer}|{dimension}": evidence.to_json()
                                                 for (peer, dimension), evidence
                                                 in self.trust.items()})

    async def _trust_save_loop(self) -> None:
        await self._save_trust()

    async def _prune_loop(self) -> None:
        if self.store is not None:
            retention = duration_seconds(self.current().spec.audit.retention)
            pruned = await self.store.prune(time.time() - retention)
            if pruned:
                log.info("audit retention pruned %d records", pruned)


async def _cancelled(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait for them to end, for at most ``STOP_SECONDS``: one that
    ignores its cancellation is left behind (and logged), not waited for forever."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    done, pending = await asyncio.wait(tasks, timeout=STOP_SECONDS)
    for task in done:
        if not task.cancelled():
            task.exception()  # retrieved: it ended on its own while being stopped
    for task in pending:
        log.warning("a federation gateway task did not end when stopped: %s", task.get_name())


# ---------------------------------------------------------------------- gRPC faces

async def _warm(upstream: Upstream) -> None:
    with contextlib.suppress(ConnectFailed):
        await upstream.connect()


def _server_options() -> list[tuple[str, Any]]:
    return [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.so_reuseport", 0),
            *SERVER_KEEPALIVE]


class LocalServicer(runtime_pb2_grpc.CapabilityRuntimeServicer):
    """``packetflow.v1.CapabilityRuntime`` for local callers: the imports as capabilities."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def Invoke(self, request: runtime_pb2.InvokeRequest,
                     context: grpc.aio.ServicerContext) -> runtime_pb2.InvokeResponse:
        metadata = tuple(context.invocation_metadata() or ())
        trace_id = trace_of(metadata)
        try:
            assert self.gateway.local_calls is not None
            output = await self.gateway.local_calls.invoke_import(
                request.capability, request.input_json, trace_id, context.time_remaining())
        except PacketFlowError as exc:
            await abort_for(context, exc, trace_id)
            raise
        context.set_trailing_metadata(self.gateway.catalog_metadata(request.capability))
        return runtime_pb2.InvokeResponse(output_json=output, trace_id=trace_id)

    async def InvokeStream(self, request: runtime_pb2.InvokeRequest,
                           context: grpc.aio.ServicerContext) -> Any:
        """Federated calls report no progress: one result event."""
        yield runtime_pb2.InvokeEvent(result=await self.Invoke(request, context))

    async def ListCapabilities(self, request: runtime_pb2.ListCapabilitiesRequest,
                               context: grpc.aio.ServicerContext
                               ) -> runtime_pb2.ListCapabilitiesResponse:
        return runtime_pb2.ListCapabilitiesResponse(capabilities=[
            runtime_pb2.CapabilitySummary(name=name, implementation="federated",
                                          intent=i.entry.intent if i.entry else "")
            for name, i in sorted(self.gateway.imports.items())])

    async def DescribeCapability(self, request: runtime_pb2.DescribeCapabilityRequest,
                                 context: grpc.aio.ServicerContext
                                 ) -> runtime_pb2.CapabilityDescription:
        from packetflow.contracts import contract_schema
        try:
            imported, link = self.gateway.resolve_import(request.name)
            entry = not_servable(request.name, imported)
        except PacketFlowError as exc:
            await abort_for(context, exc, "")
            raise
        context.set_trailing_metadata(((CATALOG_VERSION_KEY, link.version),))
        return runtime_pb2.CapabilityDescription(
            name=request.name, intent=entry.intent, implementation="federated",
            requires_schema_json=orjson.dumps(contract_schema(entry.requires)),
            provides_schema_json=orjson.dumps(contract_schema(entry.provides)),
            timeout_seconds=entry.timeout_seconds,
            dependencies_json=orjson.dumps([{
                "target": f"{imported.spec.capability} @ {imported.spec.peer}",
                "kind": "federated", "label": link.organization or imported.spec.peer,
                "external": True}]))

