"""A running gateway: the HTTP/2 listener, its own gRPC server, the table and its upkeep.

The listener (:mod:`packetflow.gateway.h2`) answers every call; the gateway's own
``grpc.aio`` server, on a Unix socket only the gateway reaches, serves health and reflection
(the listener relays those calls to it), so ``grpcurl`` and gRPC health probes work as on a
runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from packetflow.addresses import split_address
from packetflow.engine import DEFAULT_MAX_PAYLOAD_BYTES
from packetflow.gateway.h2 import Connection
from packetflow.gateway.metrics import GatewayMetrics
from packetflow.gateway.proxy import Gateway
from packetflow.gateway.routing import Routes, RoutingTable
from packetflow.gateway.upstream import Upstream
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
    connections: set[Connection] = field(default_factory=set)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    async def start(cls, address: str = "127.0.0.1:0", *, routes: Routes | None = None,
                    metrics: GatewayMetrics | None = None,
                    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> GatewayServer:
        """Listen on ``address`` (port 0 picks one) and serve ``routes``."""
        socket_dir = Path(tempfile.mkdtemp(prefix="packetflow-gateway-"))
        internal, health = await _internal_server(socket_dir / "grpc.sock")
        table = RoutingTable(metrics or GatewayMetrics())
        gateway = Gateway(table, Upstream(f"unix:{socket_dir / 'grpc.sock'}"),
                          max_payload_bytes + ENVELOPE_BYTES)
        connections: set[Connection] = set()

        def accept() -> Connection:
            conn = Connection(server=True, on_request=gateway.on_request)
            connections.add(conn)
            conn.closed.add_done_callback(lambda _: connections.discard(conn))
            return conn

        host, port = split_address(address)
        loop = asyncio.get_running_loop()
        try:
            listener = await loop.create_server(accept, host, port, reuse_address=True)
        except OSError:
            await internal.stop(0)
            shutil.rmtree(socket_dir, ignore_errors=True)
            raise
        bound = listener.sockets[0].getsockname()[1]
        server = cls(table, gateway, listener, internal, health, bound, socket_dir, connections)
        if routes is not None:
            server.apply(routes)
        server.tasks = [asyncio.create_task(server._sweep()),
                        asyncio.create_task(server._learn())]
        log.info("gateway listening", extra={"address": address, "port": bound})
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
        for conn in list(self.connections):
            conn.goaway()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                while self.connections:
                    await asyncio.wait([asyncio.ensure_future(asyncio.shield(c.closed))
                                        for c in self.connections])
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.internal.stop(0)
        await self.gateway.internal.aclose()
        await self.table.aclose()
        shutil.rmtree(self.socket_dir, ignore_errors=True)


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
