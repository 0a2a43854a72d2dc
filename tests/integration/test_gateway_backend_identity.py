"""Which workload a backend is, one case per test: real grpc.aio runtimes serving mutual TLS
with certificates of one trust domain, the gateway expecting the workload a route names and
refusing a backend that presents another (its connection fails before any call is sent)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from packetflow.client import CallError, RuntimeClient, tls_credentials
from packetflow.gateway.routes import parse_routes
from packetflow.gateway.server import GatewayServer
from packetflow.identity.local import IssuedFiles, issue_files, local_authority
from packetflow.identity.spiffe import Workload
from packetflow.identity.workload import WorkloadIdentity
from packetflow.server import RuntimeServer
from tests.conftest import eventually
from tests.integration.test_gateway_tokens import calls_served
from tests.integration.test_gateway_zero_trust import GATEWAY
from tests.integration.test_zero_trust import DOMAIN, MANIFESTS, SERVER, caller_of, secure_runtime

ALICE = Workload("team-a", "alice")
IMPOSTOR = Workload("team-a", "packetflow-impostor")  # same authority, another workload


@dataclass
class Backends:
    right: RuntimeServer
    impostor: RuntimeServer
    gateway: GatewayServer
    alice: IssuedFiles

    def client(self) -> RuntimeClient:
        return RuntimeClient(f"127.0.0.1:{self.gateway.port}", credentials=tls_credentials(
            self.alice.cert, self.alice.key, self.alice.ca))

    def refused_attempts(self) -> float:
        return self.gateway.table.metrics.registry.get_sample_value(
            "packetflow_gateway_requests_total",
            {"capability": "whoami", "version": "stable",
             "endpoint": f"127.0.0.1:{self.impostor.port}", "code": "UNAVAILABLE"}) or 0.0

    def ejections(self) -> float:
        return self.gateway.table.metrics.registry.get_sample_value(
            "packetflow_gateway_ejections_total",
            {"capability": "whoami", "endpoint": f"127.0.0.1:{self.impostor.port}",
             "reason": "consecutive-failures"}) or 0.0


@asynccontextmanager
async def backends(directory: Path, identity: str,
                   both_impostors: bool = False) -> AsyncIterator[Backends]:
    """Two runtimes (the route's workload and an impostor) behind a gateway whose route
    expects ``identity``."""
    authority = local_authority(directory, DOMAIN)
    forwarders = [caller_of(GATEWAY)]
    async with secure_runtime(directory, authority, SERVER, MANIFESTS,
                              trusted_forwarders=forwarders) as (right, _), \
            secure_runtime(directory, authority, IMPOSTOR, MANIFESTS,
                           trusted_forwarders=forwarders) as (impostor, _):
        served = [impostor] if both_impostors else [right, impostor]
        addresses = ", ".join(f"'127.0.0.1:{s.port}'" for s in served)
        routes = f"capabilities: {{whoami: {{backends: [{addresses}], identity: '{identity}'}}}}"
        own = issue_files(authority, directory, GATEWAY.service_account, GATEWAY,
                          ip_addresses=("127.0.0.1",))
        gateway = await GatewayServer.start(
            "127.0.0.1:0", routes=parse_routes(routes, "test"),
            identity=WorkloadIdentity(own.cert, own.key, own.ca))
        try:
            alice = issue_files(authority, directory, "team-a-alice", ALICE)
            yield Backends(right, impostor, gateway, alice)
        finally:
            await gateway.stop(grace=1)


@pytest.mark.parametrize("identity", [
    "team-a/packetflow-runtime", f"spiffe://{DOMAIN}/ns/team-a/sa/packetflow-runtime"])
async def test_a_backend_presenting_another_identity_is_refused_while_the_right_one_serves(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, identity: str) -> None:
    async with backends(tmp_path, identity) as found, found.client() as client:
        answered = 0

        async def impostor_ejected() -> bool:
            nonlocal answered
            assert (await client.invoke("whoami", {}, timeout=30))["caller"] \
                == caller_of(ALICE)
            answered += 1
            return found.ejections() >= 1

        with caplog.at_level(logging.WARNING, logger="packetflow.gateway"):
            await eventually(impostor_ejected, timeout=60,
                             what="the impostor to be ejected")
        assert found.refused_attempts() >= 1  # the gateway did try it, and it failed
        assert calls_served(found.impostor) == 0
        assert calls_served(found.right) == answered
    expected = str(SERVER.spiffe_id(DOMAIN))
    presented = str(IMPOSTOR.spiffe_id(DOMAIN))
    assert any(getattr(r, "expected", None) == expected
               and getattr(r, "presented", None) == presented for r in caplog.records)


async def test_a_route_of_impostors_only_fails_unavailable(tmp_path: Path) -> None:
    async with backends(tmp_path, "team-a/packetflow-runtime", both_impostors=True) as found, \
            found.client() as client:
        with pytest.raises(CallError) as caught:
            await client.invoke("whoami", {}, timeout=30)
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        assert calls_served(found.impostor) == 0
