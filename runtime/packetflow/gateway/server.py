"""A running gateway: the HTTP/2 listener, its own gRPC server, the table and its upkeep.

The listener (:mod:`packetflow.gateway.h2`) answers every call; the gateway's own
``grpc.aio`` server, on a Unix socket only the gateway reaches, serves health and reflection
(the listener relays those calls to it), so ``grpcurl`` and gRPC health probes work as on a
runtime. With an identity the listener speaks mutual TLS only: each connection's handshake
and client certificate are checked before its first frame is read. A second listener, the
token listener (``token_address``), speaks TLS without asking for a client certificate: each
call there proves its caller with a ServiceAccount token (:mod:`packetflow.gateway.callers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from packetflow.addresses import split_address
from packetflow.engine import DEFAULT_MAX_PAYLOAD_BYTES
from packetflow.gateway.callers import TokenCalls
from packetflow.gateway.h2 import Connection, Headers, Stream, StreamHandler
from packetflow.gateway.metrics import GatewayMetrics
from packetflow.gateway.proxy import Gateway
from packetflow.gateway.routing import Routes, RoutingTable
from packetflow.gateway.upstream import Upstream
from packetflow.health import plaintext_health_server
from packetflow.identity.terminator import HANDSHAKE_TIMEOUT, classify_handshake_failure
from packetflow.identity.tokens import TokenReviewer
from packetflow.identity.workload import WorkloadIdentity
from packetflow.identity.x509 import AuthenticationError
from packetflow.rpc import ACTOR_SERVICE_NAME, ENVELOPE_BYTES, SERVICE_NAME

log = logging.getLogger("packetflow.gateway")

SWEEP_SECONDS = 0.1  # how often ejections are checked for their interval's work
LEARN_RETRY_SECONDS = 5.0  # capabilities whose effects are unknown are asked again this often
LEARN_REFRESH_SECONDS = 30.0  # and known ones (a backend may have reloaded its manifests)
SERVICES = (SERVICE_NAME, ACTOR_SERVICE_NAME)


@dataclass
class GatewayServer:
    """A started gateway; ``apply`` takes each discovery snapshot."""

    table: RoutingTable
    gateway: Gateway
    listener: asyncio.Server
    internal: grpc.aio.Server
    health: HealthServicer
    port: int
    socket_dir: Path
    acceptor: TlsAcceptor | None = None
    health_server: grpc.aio.Server | None = None
    token_listener: TokenListener | None = None
    connections: set[Connection] = field(default_factory=set)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    async def start(cls, address: str = "127.0.0.1:0", *, routes: Routes | None = None,
                    metrics: GatewayMetrics | None = None,
                    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
                    identity: WorkloadIdentity | None = None,
                    health_address: str | None = None,
                    token_address: str | None = None,
                    tokens: TokenReviewer | None = None) -> GatewayServer:
        """Listen on ``address`` (port 0 picks one) and serve ``routes``; with ``identity``,
        mutual TLS on both sides; ``health_address``: plaintext gRPC health only;
        ``token_address`` (with ``identity`` and ``tokens``, which the server then owns):
        TLS where each call proves its caller with a ServiceAccount token."""
        if token_address is not None and (identity is None or tokens is None):
            raise ValueError("a token listener needs the gateway's identity and a reviewer")
        socket_dir = Path(tempfile.mkdtemp(prefix="packetflow-gateway-"))
        internal, health = await _internal_server(socket_dir / "grpc.sock")
        metrics = metrics or GatewayMetrics()
        table = RoutingTable(metrics, identity=identity)
        gateway = Gateway(table, Upstream(f"unix:{socket_dir / 'grpc.sock'}"),
                          max_payload_bytes + ENVELOPE_BYTES)
        connections: set[Connection] = set()
        acceptor = TlsAcceptor(identity, gateway.on_request, connections, metrics) \
            if identity is not None else None

        def accept() -> asyncio.Protocol:
            if acceptor is not None:
                return _Handshake(acceptor.accept)
            conn = Connection(server=True, on_request=gateway.on_request)
            connections.add(conn)
            conn.closed.add_done_callback(lambda _: connections.discard(conn))
            return conn

        host, port = split_address(address)
        loop = asyncio.get_running_loop()
        health_server = token_listener = None
        try:
            if health_address is not None:
                health_server, _ = await plaintext_health_server(health, health_address)
            if token_address is not None:
                assert identity is not None and tokens is not None
                token_listener = await TokenListener.start(
                    token_address, identity, TokenCalls(gateway, tokens, metrics),
                    connections)
            listener = await loop.create_server(accept, host, port, reuse_address=True)
        except OSError:
            await internal.stop(0)
            if health_server is not None:
                await health_server.stop(0)
            if token_listener is not None:
                await token_listener.stop()
            elif tokens is not None:
                await tokens.aclose()
            shutil.rmtree(socket_dir, ignore_errors=True)
            raise
        bound = listener.sockets[0].getsockname()[1]
        server = cls(table, gateway, listener, internal, health, bound, socket_dir, acceptor,
                     health_server, token_listener, connections)
        if routes is not None:
            server.apply(routes)
        server.tasks = [asyncio.create_task(server._sweep()),
                        asyncio.create_task(server._learn())]
        log.info("gateway listening", extra={
            "address": address, "port": bound, "mtls": identity is not None,
            "token_port": token_listener.port if token_listener is not None else None})
        return server

    def apply(self, routes: Routes) -> None:
        """Serve a new discovery snapshot (calls in flight finish where they are)."""
        self.table.apply(routes)
        self.changed.set()

    # -------------------------------------------------------------- learning effects

    async def _learn(self) -> None:
        asked: dict[str, float] = {}
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LEARN_RETRY_SECONDS):
                    await self.changed.wait()
            self.changed.clear()
            now = loop.time()
            due = [route.name for route in self.table.capabilities.values()
                   if route.backends.effects is None  # Kubernetes specs say it themselves
                   and (route.effects is None
                        or now - asked.get(route.name, 0.0) > LEARN_REFRESH_SECONDS)]
            for name in due:
                asked[name] = now
            results = await asyncio.gather(*(self.gateway.describe(name) for name in due),
                                           return_exceptions=True)
            for name, result in zip(due, results, strict=True):
                if isinstance(result, Exception):
                    log.warning("describing %s failed: %s", name, result)

    # -------------------------------------------------------------- upkeep and shutdown

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            try:
                self.table.sweep()
            except Exception:  # the upkeep must outlive any one bad sweep
                log.exception("outlier sweep failed")

    async def stop(self, grace: float = 30.0, drain: float = 0.0) -> None:
        """Report NOT_SERVING, keep serving ``drain`` seconds, then refuse new calls and let
        calls in flight finish within ``grace``."""
        for service in ("", *SERVICES):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        if drain:
            await asyncio.sleep(drain)  # load balancers need time to see NOT_SERVING
        self.listener.close()
        if self.acceptor is not None:
            self.acceptor.cancel()
        if self.token_listener is not None:
            self.token_listener.close()
        for conn in list(self.connections):
            conn.goaway()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                while self.connections:
                    await asyncio.wait([asyncio.ensure_future(asyncio.shield(c.closed))
                                        for c in self.connections])
        for conn in list(self.connections):
            if conn.transport is not None:
                # Abort: a TLS close would wait for the caller's close_notify (up to 30 s).
                conn.transport.abort()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.token_listener is not None:
            await self.token_listener.stop()
        await self.internal.stop(0)
        if self.health_server is not None:
            await self.health_server.stop(0)
        await self.gateway.internal.aclose()
        await self.table.aclose()
        shutil.rmtree(self.socket_dir, ignore_errors=True)


class TlsAcceptor:
    """Mutual TLS in front of the HTTP/2 listener: each connection's handshake, then its
    client certificate, then HTTP/2. A connection whose certificate proves nobody answers
    each call UNAUTHENTICATED saying why (nothing is forwarded); a proven one forwards its
    caller with every call. With ``client_certificate=False`` (the token listener) no
    certificate is asked for: ``on_request`` proves each call's caller itself."""

    def __init__(self, identity: WorkloadIdentity,
                 on_request: Callable[[Stream, Headers, bool], StreamHandler],
                 connections: set[Connection], metrics: GatewayMetrics, *,
                 client_certificate: bool = True) -> None:
        self.identity = identity
        self.on_request = on_request
        self.connections = connections
        self.metrics = metrics
        self.client_certificate = client_certificate
        self.handshakes: set[asyncio.Task[None]] = set()

    def accept(self, transport: asyncio.Transport) -> None:
        """Upgrade a new TCP connection (in a task of its own)."""
        task = asyncio.create_task(self._handshake(transport))
        self.handshakes.add(task)
        task.add_done_callback(self.handshakes.discard)

    def cancel(self) -> None:
        """Abandon the handshakes under way (shutdown)."""
        for task in list(self.handshakes):
            task.cancel()

    async def _handshake(self, transport: asyncio.Transport) -> None:
        peer = transport.get_extra_info("peername")
        held = _Held()
        try:
            tls = await asyncio.get_running_loop().start_tls(
                transport, held,
                self.identity.server_ssl_context(client_certificate=self.client_certificate),
                server_side=True, ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        except asyncio.CancelledError:
            transport.abort()
            raise
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            transport.abort()
            self._refused(*classify_handshake_failure(exc), peer)
            return
        assert tls is not None
        tls.pause_reading()
        conn = Connection(server=True, on_request=self.on_request)
        if self.client_certificate:
            ssl_object = tls.get_extra_info("ssl_object")
            try:
                principal = self.identity.authenticate(
                    ssl_object.getpeercert(binary_form=True))
            except AuthenticationError as exc:
                conn.refusal = exc.message
                self._refused(exc.reason, exc.message, peer)
            else:
                conn.caller = principal.caller.encode()
                conn.caller_until = principal.not_after or conn.caller_until
        self.connections.add(conn)
        conn.closed.add_done_callback(lambda _: self.connections.discard(conn))
        conn.connection_made(tls)
        tls.set_protocol(conn)
        for chunk in held.received:
            conn.data_received(chunk)
        if held.lost:
            conn.connection_lost(None)
        else:
            tls.resume_reading()

    def _refused(self, reason: str, message: str, peer: object) -> None:
        self.metrics.unauthenticated.labels(reason).inc()
        log.info("caller refused", extra={"reason": reason, "detail": message,
                                          "peer": str(peer)})


@dataclass
class TokenListener:
    """The token listener: TLS as the gateway's workload, no client certificate asked, each
    call's caller proven by its bearer token."""

    server: asyncio.Server
    acceptor: TlsAcceptor
    calls: TokenCalls
    port: int

    @classmethod
    async def start(cls, address: str, identity: WorkloadIdentity, calls: TokenCalls,
                    connections: set[Connection]) -> TokenListener:
        """Listen on ``address`` (port 0 picks one); its connections join ``connections``."""
        acceptor = TlsAcceptor(identity, calls.on_request, connections, calls.metrics,
                               client_certificate=False)
        host, port = split_address(address)
        server = await asyncio.get_running_loop().create_server(
            lambda: _Handshake(acceptor.accept), host, port, reuse_address=True)
        return cls(server, acceptor, calls, server.sockets[0].getsockname()[1])

    def close(self) -> None:
        """Stop accepting (calls on open connections go on: they drain with the others)."""
        self.server.close()
        self.acceptor.cancel()

    async def stop(self) -> None:
        """Stop accepting and reviewing."""
        self.close()
        self.calls.cancel()
        await self.calls.reviewer.aclose()


class _Handshake(asyncio.Protocol):
    """A new TCP connection, held still until the TLS upgrade takes it over."""

    def __init__(self, upgrade: Callable[[asyncio.Transport], None]) -> None:
        self.upgrade = upgrade

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Pause: the client hello is for the TLS layer, not this protocol."""
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()
        self.upgrade(transport)


class _Held(asyncio.Protocol):
    """What arrives between the end of a handshake and the authentication."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.lost = False

    def data_received(self, data: bytes) -> None:
        """Kept for the HTTP/2 connection."""
        self.received.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        """Told to the HTTP/2 connection once it exists."""
        self.lost = True


async def _internal_server(path: Path) -> tuple[grpc.aio.Server, HealthServicer]:
    """Health and reflection, on a Unix socket in a directory only this user may enter."""
    server = grpc.aio.server()
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection((
        *SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME), server)
    if server.add_insecure_port(f"unix:{path}") == 0:
        raise OSError(f"cannot listen on {path}")
    await server.start()
    for service in ("", *SERVICES):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    return server, health
