"""Plaintext ``grpc.health.v1`` beside a port that speaks mutual TLS: the kubelet's gRPC
probes cannot present a certificate, so runtimes and gateways answer them here, with the
same health servicer as their own port (nothing else is served)."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1._async import HealthServicer


async def plaintext_health_server(health: HealthServicer,
                                  address: str) -> tuple[grpc.aio.Server, int]:
    """Serve ``health`` alone on ``address`` (port 0 picks one); the server and its port."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address} (health)")
    await server.start()
    return server, port
