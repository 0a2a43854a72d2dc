"""The gateway under zero trust, one case per test: real grpc.aio runtimes serving mutual TLS,
the gateway's HTTP/2 relay speaking mutual TLS to callers and to them, callers proven by their
own certificates and authorized by the runtime as themselves."""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from packetflow.cli import build_parser
from packetflow.client import CallError, RuntimeClient, tls_credentials
from packetflow.gateway.routes import parse_routes
from packetflow.gateway.server import GatewayServer
from packetflow.identity.certs import issue, new_authority
from packetflow.identity.local import IssuedFiles, issue_files, local_authority
from packetflow.identity.spiffe import SpiffeId, Workload
from packetflow.identity.workload import WorkloadIdentity
from packetflow.v1 import runtime_pb2, runtime_pb2_grpc
from tests.conftest import eventually
from tests.integration.test_zero_trust import (
    DOMAIN,
    MANIFESTS,
    SERVER,
    Cluster,
    caller_of,
    refused,
    secure_runtime,
)
from tests.support.load import Load
from tests.support.processes import free_port, gateway_process

GATEWAY = Workload("packetflow-system", "packetflow-gateway")
ALICE = Workload("team-a", "alice")


@dataclass
class Front:
    """A runtime serving mTLS only, and a gateway in front of it."""

    cluster: Cluster
    gateway: GatewayServer
    files: IssuedFiles  # the gateway's own

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gateway.port}"

    def client(self, files: IssuedFiles, caller: str | None = None) -> RuntimeClient:
        return RuntimeClient(self.address, caller=caller,
                             credentials=tls_credentials(files.cert, files.key, files.ca))

    def refusals(self, reason: str) -> float:
        value = self.gateway.table.metrics.registry.get_sample_value(
            "packetflow_gateway_unauthenticated_connections_total", {"reason": reason})
        return value or 0.0


def gateway_files(directory: Path, cluster: Cluster) -> IssuedFiles:
    """The gateway's certificate, valid for the address callers dial."""
    return issue_files(cluster.authority, directory, GATEWAY.service_account, GATEWAY,
                       ip_addresses=("127.0.0.1",))


def routes_to(address: str) -> str:
    return f"capabilities: {{whoami: ['{address}'], guarded: ['{address}']}}"


@asynccontextmanager
async def fronted(directory: Path, *, trusted: bool = True,
                  secure_gateway: bool = True) -> AsyncIterator[Front]:
    """A runtime (believing the gateway's ``packetflow-caller`` when ``trusted``) and a
    gateway presenting its certificate to callers and the runtime (``secure_gateway``)."""
    authority = local_authority(directory, DOMAIN)
    forwarders = [caller_of(GATEWAY)] if trusted else []
    async with secure_runtime(directory, authority, SERVER, MANIFESTS,
                              trusted_forwarders=forwarders) as (server, files):
        cluster = Cluster(directory, authority, server, files)
        own = gateway_files(directory, cluster)
        identity = WorkloadIdentity(own.cert, own.key, own.ca, interval=0.0) \
            if secure_gateway else None
        gateway = await GatewayServer.start(
            "127.0.0.1:0", routes=parse_routes(routes_to(cluster.address), "test"),
            identity=identity)
        try:
            yield Front(cluster, gateway, own)
        finally:
            await gateway.stop(grace=1)


@pytest.fixture
async def front(tmp_path: Path) -> AsyncIterator[Front]:
    async with fronted(tmp_path) as started:
        yield started


async def test_a_caller_through_the_gateway_is_authorized_by_its_own_identity(
        front: Front) -> None:
    cluster = front.cluster
    async with front.client(cluster.issue(ALICE)) as client:
        assert (await client.invoke("whoami", {}, timeout=30))["caller"] == caller_of(ALICE)
    reporter = Workload("team-b", "reporter")  # guarded's access.allow names it
    async with front.client(cluster.issue(reporter)) as client:
        assert (await client.invoke("guarded", {}, timeout=30))["caller"] \
            == caller_of(reporter)


async def test_a_caller_through_the_gateway_is_refused_by_its_own_identity(
        front: Front) -> None:
    writer = Workload("team-b", "writer")  # named by no allow rule; the gateway is no excuse
    error = await refused(front.client(front.cluster.issue(writer)), "guarded")
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert error.message == (f"{caller_of(writer)} may not call capability 'guarded': named "
                             "by no access.allow rule")
    assert front.cluster.counted("packetflow_access_denied_total", kind="capability",
                                 name="guarded", rule="allow") == 1


async def test_a_caller_header_sent_to_the_gateway_is_replaced_by_the_proven_caller(
        front: Front) -> None:
    admin = caller_of(Workload("team-a", "admin"))
    async with front.client(front.cluster.issue(ALICE), caller=admin) as client:
        assert (await client.invoke("whoami", {}, timeout=30))["caller"] == caller_of(ALICE)
    bob = Workload("team-b", "bob")  # the default policy refuses him, whoever he claims to be
    error = await refused(front.client(front.cluster.issue(bob), caller=admin))
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert error.message.startswith(f"{caller_of(bob)} may not call")


async def test_the_caller_a_gateway_the_runtime_does_not_trust_forwards_is_ignored(
        tmp_path: Path) -> None:
    async with fronted(tmp_path, trusted=False) as front:
        error = await refused(front.client(front.cluster.issue(ALICE)))
    # The runtime judged the gateway itself (of another namespace), not alice.
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert error.message.startswith(f"{caller_of(GATEWAY)} may not call capability 'whoami'")


async def test_a_gateway_without_a_certificate_is_refused_by_the_runtime(
        tmp_path: Path) -> None:
    async with fronted(tmp_path, secure_gateway=False) as front, \
            RuntimeClient(front.address) as client:
        with pytest.raises(CallError) as caught:
            await client.invoke("whoami", {}, timeout=30)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    # The runtime's handshake refused the plaintext connection the gateway opened.
    assert caught.value.message == f"lost the connection to {front.cluster.address}"


async def test_the_gateway_refuses_a_certificate_of_an_unknown_authority(
        front: Front) -> None:
    stranger = new_authority(DOMAIN, "stranger")  # same trust domain, another authority
    leaf = issue(stranger, ALICE.spiffe_id(DOMAIN))
    error = await refused(front.client(front.cluster.write("stranger", leaf)))
    assert error.code == grpc.StatusCode.UNAVAILABLE  # the handshake itself fails
    await eventually(lambda: front.refusals("untrusted-certificate") >= 1,
                     what="the refused handshake to be counted")


async def test_the_gateway_refuses_an_expired_certificate(front: Front) -> None:
    now = datetime.datetime.now(datetime.UTC)
    leaf = issue(front.cluster.authority, ALICE.spiffe_id(DOMAIN),
                 not_before=now - datetime.timedelta(days=10),
                 valid_for=datetime.timedelta(days=9))
    error = await refused(front.client(front.cluster.write("expired", leaf)))
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert "the certificate expired at" in error.message
    assert front.refusals("expired") == 1


async def test_the_gateway_refuses_a_certificate_of_another_trust_domain(
        front: Front) -> None:
    # Signed by the cluster's own authority (the handshake passes), naming another domain.
    leaf = issue(front.cluster.authority, SpiffeId.of("other.test", "ns", "team-a", "sa",
                                                      "alice"), check_trust_domain=False)
    error = await refused(front.client(front.cluster.write("forged", leaf)))
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert "no trust bundle for trust domain 'other.test'" in error.message
    assert front.refusals("unknown-trust-domain") == 1


async def test_the_gateway_refuses_a_caller_without_a_certificate(front: Front) -> None:
    anonymous = grpc.ssl_channel_credentials(root_certificates=front.files.ca.read_bytes())
    async with grpc.aio.secure_channel(front.address, anonymous) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await runtime_pb2_grpc.CapabilityRuntimeStub(channel).Invoke(
                runtime_pb2.InvokeRequest(capability="whoami", input_json=b"{}"), timeout=30)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.details() == "the connection carries no client certificate"
    assert front.refusals("no-client-certificate") == 1


async def test_the_gateway_refuses_a_plaintext_caller(front: Front) -> None:
    error = await refused(RuntimeClient(front.address))
    assert error.code == grpc.StatusCode.UNAVAILABLE
    await eventually(lambda: front.refusals("plaintext") >= 1,
                     what="the plaintext connection to be counted")


async def test_the_gateways_certificate_rotates_under_load_without_failed_calls(
        front: Front) -> None:
    alice = front.cluster.issue(ALICE)
    identity = front.gateway.acceptor.identity  # type: ignore[union-attr]
    seen = front.cluster.server.engine.guard._by_certificate  # type: ignore[union-attr]
    async with front.client(alice) as client:

        async def batch() -> int:
            assert (await client.invoke("whoami", {}, timeout=30))["caller"] \
                == caller_of(ALICE)
            return 1

        async with Load(batch) as load:
            generation = identity.generation
            rotated = gateway_files(front.cluster.directory, front.cluster)
            new = x509.load_pem_x509_certificate(rotated.cert.read_bytes())
            await eventually(lambda: identity.generation > generation, timeout=30,
                             what="the gateway to reload its certificate")
            await load.goes_on()
            # New callers' handshakes see the new certificate too.
            async with front.client(alice) as fresh:
                await fresh.invoke("whoami", {}, timeout=30)
    assert load.failures == []
    # The runtime now sees the gateway's new certificate on a new connection.
    assert any(x509.load_pem_x509_certificate(pem) == new for pem in seen)


async def test_the_gateway_process_serves_mutual_tls_and_plaintext_health(
        tmp_path: Path, front: Front) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(routes_to(front.cluster.address))
    port, health = free_port(), f"127.0.0.1:{free_port()}"
    own = front.files
    log = tmp_path / "gateway.log"
    process = gateway_process(routes, log, port, args=[
        "--cert", str(own.cert), "--key", str(own.key), "--ca", str(own.ca),
        "--health-address", health])
    try:
        assert f"mutual TLS as {caller_of(GATEWAY)}" in log.read_text()
        async with grpc.aio.insecure_channel(health) as channel:  # the kubelet's probe
            checked = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=30)
        assert checked.status == health_pb2.HealthCheckResponse.SERVING
        alice = front.cluster.issue(ALICE)
        async with RuntimeClient(f"127.0.0.1:{port}", credentials=tls_credentials(
                alice.cert, alice.key, alice.ca)) as client:
            assert (await client.invoke("whoami", {}, timeout=30))["caller"] \
                == caller_of(ALICE)
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_the_gateway_names_missing_tls_flags(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text("capabilities: {}")
    args = build_parser().parse_args(["gateway", "--routes", str(routes), "--cert",
                                      str(tmp_path / "x.crt")])
    assert args.func(args) == 2
    assert "error: tls_cert, tls_key and tls_ca go together (PACKETFLOW_TLS_CERT, " \
        "PACKETFLOW_TLS_KEY, PACKETFLOW_TLS_CA)" in capsys.readouterr().err
