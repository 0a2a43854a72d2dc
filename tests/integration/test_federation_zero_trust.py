"""Zero trust inside the exporter's cluster: its runtime speaks mutual TLS only (certificates
from a cluster authority on disk, gRPC's native TLS), and the federation gateway reaches it
with a workload identity of its own, never its federation identity. Real servers: the
runtime, both gateways, TLS 1.3 on every hop."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from packetflow.federation.cli import cmd_gateway
from packetflow.federation.settings import load_settings
from packetflow.identity.certs import Issued
from packetflow.identity.local import IssuedFiles, issue_files, local_authority
from packetflow.identity.spiffe import Workload
from packetflow.settings import RuntimeSettings
from packetflow.v1 import runtime_pb2, runtime_pb2_grpc
from tests.conftest import eventually
from tests.support.federation import (
    CALLS,
    Federation,
    audit_of,
    config_text,
    make_org,
    running_federation,
    write_atomically,
)

CLUSTER = "cluster.globex"  # globex's cluster trust domain (not its federation one)
RUNTIME = Workload("shop", "packetflow-runtime")
GATEWAY = Workload("shop", "packetflow-federation-partners")  # the runtime's namespace
STRANGER = Workload("elsewhere", "packetflow-federation-partners")
REQUEST = runtime_pb2.InvokeRequest(capability="globex-translate", input_json=b'{"text": "a"}')


@dataclass
class Cluster:
    """globex's cluster authority and the files its workloads were issued."""

    directory: Path
    authority: Issued
    runtime: IssuedFiles

    def issue(self, workload: Workload) -> IssuedFiles:
        """The federation gateway's workload files (issued again: rotation)."""
        return issue_files(self.authority, self.directory, "federation", workload)

    def runtime_settings(self) -> RuntimeSettings:
        """The exporter runtime's zero-trust settings (default policy: namespace)."""
        return RuntimeSettings(tls_cert=self.runtime.cert, tls_key=self.runtime.key,
                               tls_ca=self.runtime.ca, metrics_address=None)


@pytest.fixture
def cluster(tmp_path: Path) -> Cluster:
    directory = tmp_path / "cluster"
    authority = local_authority(directory, CLUSTER)
    runtime = issue_files(authority, directory, "runtime", RUNTIME,
                          ip_addresses=("127.0.0.1",))
    return Cluster(directory, authority, runtime)


def workload_section(files: IssuedFiles, health_address: str | None = None) -> str:
    health = f", health_address: '{health_address}'" if health_address else ""
    return (f"  workload: {{tls_cert: '{files.cert}', tls_key: '{files.key}', "
            f"tls_ca: '{files.ca}'{health}}}\n")


@pytest.fixture
async def federation(tmp_path: Path, cluster: Cluster) -> AsyncIterator[Federation]:
    async with running_federation(
            tmp_path, runtime_settings=cluster.runtime_settings(),
            exporter_extra=workload_section(cluster.issue(GATEWAY))) as running:
        assert running.exporter.workload is not None
        running.exporter.workload.watched.interval = 0.0  # rotation seen at once
        yield running


async def test_the_exporter_reaches_an_mtls_runtime_as_its_workload(
        federation: Federation) -> None:
    reply = await federation.local_stub().Invoke(REQUEST, timeout=30)
    assert reply.output_json == b'{"text":"[fr] a"}'
    # The runtime proved the gateway's workload certificate and admitted it by its
    # namespace: that workload is the caller, not the peer's claim nor the federation ID.
    assert CALLS[-1]["caller"] == str(GATEWAY.spiffe_id(CLUSTER))
    inbound = [r.record for r in await audit_of(federation.exporter)
               if r.record.capability == "translate"]
    assert (inbound[-1].decision, inbound[-1].code, inbound[-1].peer) == ("allow", "OK", "acme")


async def test_a_rotated_workload_certificate_is_presented_on_new_connections(
        federation: Federation, cluster: Cluster) -> None:
    stub = federation.local_stub()
    await stub.Invoke(REQUEST, timeout=30)
    # Rotated to an identity of another namespace, which the runtime's default policy
    # (namespace) refuses: the refusal names the new certificate's SPIFFE ID.
    cluster.issue(STRANGER)
    stranger = str(STRANGER.spiffe_id(CLUSTER))

    async def refused_as_the_new_identity() -> bool:
        try:
            await stub.Invoke(REQUEST, timeout=30)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.PERMISSION_DENIED, exc.details()
            return stranger in (exc.details() or "")
        return False

    await eventually(refused_as_the_new_identity, timeout=30, what="the rotated certificate")
    cluster.issue(GATEWAY)  # and back: admitted again
    await eventually(lambda: _succeeds(stub), timeout=30, what="the certificate rotated back")
    assert CALLS[-1]["caller"] == str(GATEWAY.spiffe_id(CLUSTER))


async def _succeeds(stub: object) -> bool:
    try:
        await stub.Invoke(REQUEST, timeout=30)  # type: ignore[attr-defined]
    except grpc.aio.AioRpcError:
        return False
    return True


async def test_without_a_workload_identity_the_mtls_runtime_refuses_the_gateway(
        tmp_path: Path, cluster: Cluster) -> None:
    async with running_federation(tmp_path, runtime_settings=cluster.runtime_settings(),
                                  ready=False) as federation:
        assert federation.exporter.workload is None
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await federation.acme_stub().Invoke(runtime_pb2.InvokeRequest(
                capability="translate", input_json=b'{"text": "a"}'), timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert refused.value.details() == (
            "capability 'translate' is not reachable here now (the runtime answered the "
            "federation gateway UNAVAILABLE)")
        assert not [c for c in CALLS if c["capability"] == "translate"]
        record = [r.record for r in await audit_of(federation.exporter)
                  if r.record.capability == "translate"][-1]
        assert (record.peer, record.code) == ("acme", "UNAVAILABLE")
        assert record.reason.startswith("unavailable: capability 'translate' is not reachable")


async def test_the_kubelet_probes_a_plaintext_health_port_that_serves_nothing_else(
        tmp_path: Path, cluster: Cluster) -> None:
    async with running_federation(
            tmp_path, runtime_settings=cluster.runtime_settings(),
            exporter_extra=workload_section(cluster.issue(GATEWAY), "127.0.0.1:0")) as running:
        port = running.exporter.health_port
        assert port is not None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            answer = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=30)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await runtime_pb2_grpc.CapabilityRuntimeStub(channel).Invoke(REQUEST,
                                                                             timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert not [c for c in CALLS if c["capability"] == "translate"]


def test_the_workload_files_come_from_the_environment_unless_the_file_names_them(
        tmp_path: Path, cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    globex, acme = make_org(tmp_path, "globex"), make_org(tmp_path, "acme")
    config = globex.directory / "federation.yaml"
    files = cluster.issue(GATEWAY)
    monkeypatch.setenv("PACKETFLOW_TLS_CERT", str(files.cert))
    monkeypatch.setenv("PACKETFLOW_TLS_KEY", str(files.key))
    monkeypatch.setenv("PACKETFLOW_TLS_CA", str(files.ca))
    write_atomically(config, config_text(globex, [(acme, "127.0.0.1:1")]).encode())
    assert load_settings(config).workload.tls_cert == files.cert
    write_atomically(config, config_text(globex, [(acme, "127.0.0.1:1")], extra=(
        "  workload: {tls_cert: w.crt, tls_key: w.key, tls_ca: ca.crt}\n")).encode())
    workload = load_settings(config).workload
    assert (workload.tls_cert, workload.tls_key) == (Path("w.crt"), Path("w.key"))


def test_an_unreadable_workload_certificate_stops_the_gateway_naming_the_file(
        tmp_path: Path, cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    globex, acme = make_org(tmp_path, "globex"), make_org(tmp_path, "acme")
    config = globex.directory / "federation.yaml"
    files = cluster.issue(GATEWAY)
    write_atomically(config, config_text(globex, [(acme, "127.0.0.1:1")], extra=(
        f"  workload: {{tls_cert: missing.crt, tls_key: '{files.key}', "
        f"tls_ca: '{files.ca}'}}\n")).encode())
    assert cmd_gateway(argparse.Namespace(config=config, federation_command=None)) == 1
    error = capsys.readouterr().err
    assert "gateway.workload (PACKETFLOW_TLS_*)" in error
    assert str(globex.directory / "missing.crt") in error
