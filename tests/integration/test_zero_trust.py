"""Zero trust in one cluster, one case per test: a real grpc.aio runtime speaking mutual TLS
(gRPC's native TLS, certificates from a local authority on disk), callers proven by their
certificates, each capability's ``access`` applied, refusals counted in the metrics."""

from __future__ import annotations

import datetime
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from packetflow.actors import ActorSystem
from packetflow.client import CallError, RuntimeClient, tls_credentials
from packetflow.engine import Engine
from packetflow.identity.certs import Issued, issue, new_authority
from packetflow.identity.files import write_atomically
from packetflow.identity.local import IssuedFiles, issue_files, local_authority
from packetflow.identity.spiffe import SpiffeId, Workload
from packetflow.identity.workload import WorkloadIdentity
from packetflow.manifests import load_text, parse_manifest
from packetflow.operator import render
from packetflow.operator.settings import OperatorSettings
from packetflow.serve import secure_engine
from packetflow.server import RuntimeServer
from packetflow.settings import RuntimeSettings
from packetflow.spec import Capability
from tests.conftest import eventually
from tests.support.load import Load
from tests.support.processes import ROOT, RuntimeProcess, free_port, packetflow

DOMAIN = "cluster.test"
SERVER = Workload("team-a", "packetflow-runtime")
# whoami: no access (the default policy, namespace); guarded: rules naming team-b's reporter
# and team-c, but never team-c's intruder.
MANIFESTS = """
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: whoami}
spec:
  intent: Report the proven caller
  implementation: {python: {module: tests.support.handlers, function: whoami}}
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: guarded}
spec:
  intent: Report the proven caller, to some
  implementation: {python: {module: tests.support.handlers, function: whoami}}
  access:
    allow: [{serviceAccount: team-b/reporter}, {namespace: team-c}]
    deny: [{serviceAccount: team-c/intruder}]
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: relayed}
spec:
  intent: Report the proven caller, to the relay's pods only
  implementation: {python: {module: tests.support.handlers, function: whoami}}
  access:
    allow: [{capability: relay}]
---
apiVersion: packetflow.io/v1alpha1
kind: Actor
metadata: {name: ledger}
spec:
  intent: Record numbers, for team-b's reporter only
  requires: {n: {type: integer}}
  implementation: {python: {module: tests.support.actor_handlers, class: Ledger}}
  access:
    allow: [{serviceAccount: team-b/reporter}]
"""


def relay_manifests(address: str) -> str:
    """Compositions whose steps call the guarded runtime at ``address``."""
    return "---".join(f"""
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {{name: {name}}}
spec:
  intent: Ask {target} who called
  implementation:
    composition:
      steps: [{{name: who, call: {{capability: {target}, address: "{address}", input: {{}}}}}}]
      output: steps.who
""" for name, target in (("relay", "relayed"), ("relay-guarded", "guarded")))


@dataclass
class Cluster:
    """A trust domain's authority in ``directory`` and a runtime serving mTLS only."""

    directory: Path
    authority: Issued
    server: RuntimeServer
    files: IssuedFiles

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def issue(self, workload: Workload) -> IssuedFiles:
        """A client certificate for ``workload`` (files ``<ns>-<sa>.crt/.key``)."""
        return issue_files(self.authority, self.directory,
                           f"{workload.namespace}-{workload.service_account}", workload)

    def client(self, files: IssuedFiles, caller: str | None = None) -> RuntimeClient:
        return RuntimeClient(self.address, caller=caller,
                             credentials=tls_credentials(files.cert, files.key, files.ca))

    def write(self, stem: str, issued: Issued) -> IssuedFiles:
        """Client files from a certificate made here (another authority, expired...)."""
        files = IssuedFiles(self.directory / f"{stem}.crt", self.directory / f"{stem}.key",
                            self.directory / "ca.crt")
        write_atomically(files.key, issued.key_pem, private=True)
        write_atomically(files.cert, issued.certificate_pem)
        return files

    def counted(self, metric: str, **labels: str) -> float:
        value = self.server.engine.metrics.registry.get_sample_value(metric, labels)
        return value or 0.0


@asynccontextmanager
async def secure_runtime(directory: Path, authority: Issued, workload: Workload,
                         manifests: str, **settings: Any
                         ) -> AsyncIterator[tuple[RuntimeServer, IssuedFiles]]:
    """A runtime serving ``manifests`` over mTLS only, as ``workload`` (files ``<sa>.*``);
    ``settings``: more RuntimeSettings (trusted forwarders...)."""
    files = issue_files(authority, directory, workload.service_account, workload,
                        ip_addresses=("127.0.0.1",))
    loaded = load_text(manifests, "test_zero_trust.py")
    assert not loaded.errors
    engine = Engine(loaded.capabilities)
    assert secure_engine(engine, RuntimeSettings(
        tls_cert=files.cert, tls_key=files.key, tls_ca=files.ca, metrics_address=None,
        **settings))
    # Material re-read at once: rotation is seen at the next handshake.
    assert engine.guard is not None
    engine.guard.identity.watched.interval = 0.0
    actors = None
    if loaded.actors:
        actors = ActorSystem(engine, state_dir=directory / f"{workload.service_account}-state")
        assert not await actors.replace(loaded.actors)
    server = await RuntimeServer.start(engine, "127.0.0.1:0", actors,
                                       token_address=settings.get("token_address"))
    try:
        yield server, files
    finally:
        await server.stop(grace=0)
        if actors is not None:
            await actors.aclose()
        await engine.aclose()


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    authority = local_authority(tmp_path, DOMAIN)
    async with secure_runtime(tmp_path, authority, SERVER, MANIFESTS) as (server, files):
        yield Cluster(tmp_path, authority, server, files)


def caller_of(workload: Workload) -> str:
    return str(workload.spiffe_id(DOMAIN))


async def refused(client: RuntimeClient, capability: str = "whoami") -> CallError:
    async with client:
        with pytest.raises(CallError) as caught:
            await client.invoke(capability, {}, timeout=30)
    return caught.value


async def test_a_workload_of_the_namespace_is_served_as_its_certificate_says(
        cluster: Cluster) -> None:
    alice = Workload("team-a", "alice")
    async with cluster.client(cluster.issue(alice)) as client:
        assert (await client.invoke("whoami", {}, timeout=30))["caller"] == caller_of(alice)


async def test_a_certificate_of_an_unknown_authority_is_refused(cluster: Cluster) -> None:
    stranger = new_authority(DOMAIN, "stranger")  # same trust domain, another authority
    leaf = issue(stranger, Workload("team-a", "alice").spiffe_id(DOMAIN))
    error = await refused(cluster.client(cluster.write("stranger", leaf)))
    assert error.code == grpc.StatusCode.UNAVAILABLE  # the handshake itself fails


async def test_an_expired_certificate_is_refused(cluster: Cluster) -> None:
    now = datetime.datetime.now(datetime.UTC)
    leaf = issue(cluster.authority, Workload("team-a", "alice").spiffe_id(DOMAIN),
                 not_before=now - datetime.timedelta(days=10),
                 valid_for=datetime.timedelta(days=9))
    error = await refused(cluster.client(cluster.write("expired", leaf)))
    assert error.code == grpc.StatusCode.UNAVAILABLE


async def test_a_certificate_claiming_another_trust_domain_is_refused(
        cluster: Cluster) -> None:
    # Signed by our own authority (so the handshake passes), naming another trust domain.
    leaf = issue(cluster.authority, SpiffeId.of("other.test", "ns", "team-a", "sa", "alice"),
                 check_trust_domain=False)
    error = await refused(cluster.client(cluster.write("forged", leaf)))
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert "spiffe://other.test/ns/team-a/sa/alice is not of this cluster's trust domain " \
        "'cluster.test'" in error.message
    assert cluster.counted("packetflow_unauthenticated_calls_total",
                           reason="wrong-trust-domain") == 1


async def test_a_plaintext_caller_is_refused(cluster: Cluster) -> None:
    async with RuntimeClient(cluster.address) as client:
        with pytest.raises(CallError) as caught:
            await client.invoke("whoami", {}, timeout=30)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


async def test_a_spoofed_caller_header_is_ignored(cluster: Cluster) -> None:
    alice = Workload("team-a", "alice")
    admin = caller_of(Workload("team-a", "admin"))
    async with cluster.client(cluster.issue(alice), caller=admin) as client:
        assert (await client.invoke("whoami", {}, timeout=30))["caller"] == caller_of(alice)
    # Nor does a spoofed header let in a caller the policy refuses.
    error = await refused(cluster.client(cluster.issue(Workload("team-b", "bob")),
                                         caller=admin))
    assert error.code == grpc.StatusCode.PERMISSION_DENIED


async def test_a_caller_no_allow_rule_names_is_refused_naming_the_rule(
        cluster: Cluster) -> None:
    writer = Workload("team-b", "writer")
    error = await refused(cluster.client(cluster.issue(writer)), "guarded")
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert error.message == (f"{caller_of(writer)} may not call capability 'guarded': named "
                             "by no access.allow rule")
    assert cluster.counted("packetflow_access_denied_total", kind="capability",
                           name="guarded", rule="allow") == 1
    # Those the rules name are served.
    for allowed in (Workload("team-b", "reporter"), Workload("team-c", "friend")):
        async with cluster.client(cluster.issue(allowed)) as client:
            assert (await client.invoke("guarded", {}, timeout=30))["caller"] \
                == caller_of(allowed)


async def test_deny_overrides_allow(cluster: Cluster) -> None:
    intruder = Workload("team-c", "intruder")  # its namespace is allowed, itself denied
    error = await refused(cluster.client(cluster.issue(intruder)), "guarded")
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert error.message.endswith("refused by access.deny[0] (serviceAccount: "
                                  "team-c/intruder)")
    assert cluster.counted("packetflow_access_denied_total", kind="capability",
                           name="guarded", rule="deny[0]") == 1
    assert cluster.counted("packetflow_capability_calls_total", capability="guarded",
                           code="PERMISSION_DENIED") == 1


async def test_without_access_the_default_policy_admits_the_namespace_only(
        cluster: Cluster) -> None:
    bob = Workload("team-b", "bob")
    error = await refused(cluster.client(cluster.issue(bob)))
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert "the default policy 'namespace' admits callers from namespace 'team-a' only" \
        in error.message
    assert cluster.counted("packetflow_access_denied_total", kind="capability",
                           name="whoami", rule="default:namespace") == 1
    async with cluster.client(cluster.issue(Workload("team-a", "carol"))) as client:
        await client.invoke("whoami", {}, timeout=30)


def served_certificate(address: str, client: IssuedFiles) -> x509.Certificate:
    """The certificate the runtime presents to a new handshake now."""
    context = WorkloadIdentity(client.cert, client.key, client.ca).client_ssl_context()
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as raw, \
            context.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


async def test_rotation_under_load_fails_no_call(cluster: Cluster) -> None:
    alice = cluster.issue(Workload("team-a", "alice"))
    identity = cluster.server.engine.guard.identity  # type: ignore[union-attr]

    async def batch() -> int:
        # A new channel every few calls: handshakes go on all through the rotation.
        async with cluster.client(alice) as client:
            for _ in range(5):
                await client.invoke("whoami", {}, timeout=30)
        return 5

    async def rotated(step: str, generation: int) -> None:
        await eventually(lambda: identity.generation > generation, timeout=30,
                         what=f"the runtime to reload ({step})")
        await load.goes_on()

    async with Load(batch) as load:
        # 1. The server's certificate, same authority.
        generation = identity.generation
        server = issue_files(cluster.authority, cluster.directory, SERVER.service_account,
                             SERVER, ip_addresses=("127.0.0.1",))
        await rotated("server certificate", generation)
        assert served_certificate(cluster.address, alice) \
            == x509.load_pem_x509_certificate(server.cert.read_bytes())
        # 2. A new authority: trusted beside the old one first, then the server moves to it,
        # then a client of the new authority calls while old clients go on.
        old = cluster.authority
        new = new_authority(DOMAIN, "packetflow")
        generation = identity.generation
        write_atomically(cluster.files.ca, old.certificate_pem + new.certificate_pem)
        await rotated("bundle with both authorities", generation)
        generation = identity.generation
        issue_files(new, cluster.directory, SERVER.service_account, SERVER,
                    ip_addresses=("127.0.0.1",))
        await rotated("server certificate of the new authority", generation)
        cluster.authority = new
        bob = cluster.issue(Workload("team-a", "bob"))
        async with cluster.client(bob) as client:
            assert (await client.invoke("whoami", {}, timeout=30))["caller"] \
                == caller_of(Workload("team-a", "bob"))
    assert load.failures == []
    assert load.done >= 200


@pytest.fixture
def dev_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "echo.yaml").write_text(
        "apiVersion: packetflow.io/v1alpha1\nkind: Capability\nmetadata: {name: echo}\n"
        "spec: {intent: x, implementation: {builtin: {name: echo}}}\n")
    state = tmp_path / "state"
    process = subprocess.Popen(
        [sys.executable, "-m", "packetflow.cli", "dev", str(tmp_path / "app"), "--mtls",
         "--no-reload", "--address", "127.0.0.1:0", "--metrics-address", "", "--state-dir",
         str(state)], cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        env={**os.environ, "PACKETFLOW_LOG_LEVEL": "WARNING"})
    try:
        yield process, state
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        assert process.stderr is not None
        process.stderr.close()


def test_dev_mtls_and_call_with_certificates(
        dev_process: tuple[subprocess.Popen[str], Path]) -> None:
    process, state = dev_process
    assert process.stderr is not None
    flags: list[str] = []
    address = ""
    for line in process.stderr:
        if "call as the developer with" in line:
            flags = line.split("call as the developer with", 1)[1].split()
        if "packetflow: serving" in line:
            address = f"127.0.0.1:{line.split(' on port ')[1].split()[0]}"
            break
    assert flags == ["--cert", str(state / "tls" / "client.crt"), "--key",
                     str(state / "tls" / "client.key"), "--ca", str(state / "tls" / "ca.crt")]
    called = packetflow("call", "echo", "--data", '{"said": "hi"}', "--address", address,
                        *flags, timeout=60)
    assert called.returncode == 0, called.stderr
    assert orjson.loads(called.stdout) == {"said": "hi"}
    plain = packetflow("call", "echo", "--address", address, "--timeout", "10", timeout=60)
    assert plain.returncode != 0
    assert "UNAVAILABLE" in plain.stderr
    partial = packetflow("call", "echo", "--address", address, "--cert", flags[1], timeout=60)
    assert partial.returncode == 2
    assert "mutual TLS needs --cert, --key and --ca; missing --key, --ca" in partial.stderr


async def test_a_composition_calls_as_its_own_workload(cluster: Cluster) -> None:
    relay = Workload("team-a", "packetflow-relay")  # what `capability: relay` names
    async with secure_runtime(cluster.directory, cluster.authority, relay,
                              relay_manifests(cluster.address)) as (front, _):
        alice = cluster.issue(Workload("team-a", "alice"))
        async with RuntimeClient(f"127.0.0.1:{front.port}", credentials=tls_credentials(
                alice.cert, alice.key, alice.ca)) as client:
            # The called runtime sees the relay's workload, not alice (who called the relay).
            assert (await client.invoke("relay", {}, timeout=30))["caller"] \
                == caller_of(relay)
            with pytest.raises(CallError) as caught:
                await client.invoke("relay-guarded", {}, timeout=30)
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert f"{caller_of(relay)} may not call capability 'guarded'" in caught.value.message
    assert cluster.counted("packetflow_access_denied_total", kind="capability",
                           name="guarded", rule="allow") == 1


async def test_a_trusted_forwarder_names_the_caller(cluster: Cluster) -> None:
    # The runtime's own workload (actor members forwarding to each other) is trusted.
    alice = caller_of(Workload("team-a", "alice"))
    async with cluster.client(cluster.files, caller=alice) as client:
        assert (await client.invoke("whoami", {}, timeout=30))["caller"] == alice
    # The forwarded caller is authorized, not the forwarder.
    bob = caller_of(Workload("team-b", "bob"))
    error = await refused(cluster.client(cluster.files, caller=bob))
    assert error.code == grpc.StatusCode.PERMISSION_DENIED and bob in error.message
    # A forwarded caller of another trust domain is no caller.
    error = await refused(cluster.client(cluster.files,
                                         caller="spiffe://other.test/ns/team-a/sa/alice"))
    assert error.code == grpc.StatusCode.UNAUTHENTICATED


async def test_an_actor_types_access_is_applied(cluster: Cluster) -> None:
    alice = Workload("team-a", "alice")  # of the runtime's namespace, but not allowed
    async with cluster.client(cluster.issue(alice)) as client:
        with pytest.raises(CallError) as caught:
            await client.send("ledger", "a", {"n": 1}, timeout=30)
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.message == (f"{caller_of(alice)} may not call actor 'ledger': "
                                    "named by no access.allow rule")
    assert cluster.counted("packetflow_access_denied_total", kind="actor", name="ledger",
                           rule="allow") == 1
    async with cluster.client(cluster.issue(Workload("team-b", "reporter"))) as client:
        assert await client.send("ledger", "a", {"n": 1}, timeout=30) == {"n": 1, "count": 1}


def kubelet_env(env: list[dict[str, Any]], namespace: str) -> dict[str, str]:
    """A container's variables as the kubelet sets them: ``metadata.namespace`` field refs
    filled in, ``$(NAME)`` replaced by an earlier variable's value (Secrets left out)."""
    found: dict[str, str] = {}
    for item in env:
        if "value" in item:
            found[item["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                                         lambda ref: found.get(ref[1], ref[0]), item["value"])
        elif item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == \
                "metadata.namespace":
            found[item["name"]] = namespace
    return found


async def test_a_runtime_pod_as_the_operator_renders_it_serves_mtls_and_plaintext_health(
        tmp_path: Path, processes: list[RuntimeProcess]) -> None:
    settings = OperatorSettings(mtls_issuer="ClusterIssuer/ca", trust_domain=DOMAIN)
    pay = parse_manifest({"apiVersion": "packetflow.io/v1alpha1", "kind": "Capability",
                          "metadata": {"name": "pay", "namespace": "team-a"},
                          "spec": {"intent": "Pay", "implementation": {
                              "builtin": {"name": "echo"}}}})
    assert isinstance(pay, Capability)
    (container,) = render.render_deployment(pay, "team-a", settings)[
        "spec"]["template"]["spec"]["containers"]
    # What cert-manager writes into the Secret, for the SPIFFE ID the Certificate names.
    (certificate,) = render.render_certificate(pay, "team-a", settings)["spec"]["uris"]
    authority = local_authority(tmp_path / "ca", DOMAIN)
    leaf = issue(authority, SpiffeId.parse(certificate), ip_addresses=("127.0.0.1",))
    identity = tmp_path / "identity"
    identity.mkdir()
    (identity / "tls.crt").write_bytes(leaf.certificate_pem)
    (identity / "tls.key").write_bytes(leaf.key_pem)
    (identity / "ca.crt").write_bytes(authority.certificate_pem)
    health = f"127.0.0.1:{free_port()}"
    env = {name: value.replace(render.IDENTITY_DIR, str(identity))
           for name, value in kubelet_env(container["env"], "team-a").items()}
    env.update(PACKETFLOW_HEALTH_ADDRESS=health, PACKETFLOW_STATE_DIR=str(tmp_path / "state"))
    bundle = tmp_path / "bundle.yaml"
    bundle.write_text(render.render_bundle(pay))
    runtime = RuntimeProcess(bundle, tmp_path / "state", tmp_path / "runtime.log", env)
    processes.append(runtime)

    async with grpc.aio.insecure_channel(health) as channel:  # the kubelet's probe
        checked = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=30)
    assert checked.status == health_pb2.HealthCheckResponse.SERVING
    for workload, allowed in ((Workload("team-a", "alice"), True),
                              (Workload("team-b", "bob"), False)):
        files = issue_files(authority, tmp_path, workload.service_account, workload)
        async with RuntimeClient(runtime.address, credentials=tls_credentials(
                files.cert, files.key, identity / "ca.crt")) as client:
            if allowed:
                assert await client.invoke("pay", {"n": 1}, timeout=30) == {"n": 1}
                continue
            with pytest.raises(CallError) as caught:
                await client.invoke("pay", {"n": 1}, timeout=30)
        assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED  # default: namespace
    async with RuntimeClient(runtime.address) as plain:
        with pytest.raises(CallError) as caught:
            await plain.invoke("pay", {}, timeout=30)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


async def test_a_workloads_own_certificate_rotates_under_load_without_failed_calls(
        cluster: Cluster) -> None:
    relay = Workload("team-a", "packetflow-relay")
    async with secure_runtime(cluster.directory, cluster.authority, relay,
                              relay_manifests(cluster.address)) as (front, _):
        alice = cluster.issue(Workload("team-a", "alice"))
        identity = front.engine.guard.identity  # type: ignore[union-attr]
        seen = cluster.server.engine.guard._by_certificate  # type: ignore[union-attr]
        async with RuntimeClient(f"127.0.0.1:{front.port}", credentials=tls_credentials(
                alice.cert, alice.key, alice.ca)) as client:

            async def batch() -> int:
                await client.invoke("relay", {}, timeout=30)
                return 1

            async with Load(batch) as load:
                generation = identity.generation
                rotated = issue_files(cluster.authority, cluster.directory,
                                      relay.service_account, relay,
                                      ip_addresses=("127.0.0.1",))
                new = x509.load_pem_x509_certificate(rotated.cert.read_bytes())
                await eventually(lambda: identity.generation > generation, timeout=30,
                                 what="the relay to reload its certificate")
                await load.goes_on()
    assert load.failures == []
    # The relay's calls now come over new channels, with its new certificate.
    assert any(x509.load_pem_x509_certificate(pem) == new for pem in seen)
