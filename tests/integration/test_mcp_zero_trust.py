"""The MCP endpoint under zero trust, one case per test: HTTPS with client certificates in
front of real runtimes serving mutual TLS; callers proven by their certificates, the MCP
aggregate forwarding each tool call as its caller to the capability's runtime, which
authorizes that caller (the official MCP client over real connections)."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import orjson
import pytest
from cryptography import x509
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client

from packetflow.identity.certs import issue, new_authority
from packetflow.identity.local import IssuedFiles, issue_files, local_authority
from packetflow.identity.spiffe import SpiffeId, Workload
from packetflow.identity.tls import client_context, load_credentials
from packetflow.identity.tokens import TokenReviewer
from packetflow.mcp.http import ALPN_HTTP1, McpHttpServer
from packetflow.mcp.server import McpService
from packetflow.server import RuntimeServer
from tests.conftest import eventually
from tests.integration.test_zero_trust import (
    DOMAIN,
    MANIFESTS,
    SERVER,
    Cluster,
    caller_of,
    secure_runtime,
)

AGGREGATE = Workload("packetflow-system", "packetflow-mcp")
ALICE = Workload("team-a", "alice")


def aggregate_manifests(address: str) -> str:
    """What the operator's MCP bundle holds: per capability, one forwarding its calls."""
    return "---".join(f"""
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {{name: {name}}}
spec:
  intent: Forward to {name}
  implementation:
    composition:
      steps: [{{call: {{capability: {name}, address: "{address}"}}}}]
""" for name in ("whoami", "guarded"))


@dataclass
class Aggregate:
    cluster: Cluster
    runtime: RuntimeServer  # the aggregate's own runtime
    mcp: McpHttpServer

    def client(self, files: IssuedFiles | None,
               token: str | None = None) -> tuple[httpx2.AsyncClient, Client]:
        """The official MCP client presenting ``files`` (None: no certificate) and ``token``
        as its bearer token."""
        credentials = load_credentials(files.cert, files.key) if files is not None else None
        # The endpoint is identified by its SPIFFE ID (no host name is checked).
        context = client_context(credentials, self.cluster.files.ca.read_bytes())
        context.set_alpn_protocols([ALPN_HTTP1])
        headers = {"Authorization": f"Bearer {token}"} if token else None
        http = httpx2.AsyncClient(verify=context, headers=headers)
        return http, Client(streamable_http_client(self.mcp.url, http_client=http))


@asynccontextmanager
async def aggregated(directory: Path,
                     tokens: TokenReviewer | None = None) -> AsyncIterator[Aggregate]:
    """A runtime trusting the aggregate as a forwarder, and the aggregate (a runtime as the
    chart runs it: forwarding callers, admitting the cluster) serving MCP over HTTPS
    (``tokens``: accepting ServiceAccount tokens too)."""
    authority = local_authority(directory, DOMAIN)
    async with secure_runtime(directory, authority, SERVER, MANIFESTS,
                              trusted_forwarders=[caller_of(AGGREGATE)]) as (server, files):
        cluster = Cluster(directory, authority, server, files)
        async with secure_runtime(directory, authority, AGGREGATE,
                                  aggregate_manifests(cluster.address), forward_caller=True,
                                  default_policy="cluster") as (front, _):
            assert front.engine.guard is not None
            mcp = await McpHttpServer.start(McpService.for_engine(front.engine),
                                            identity=front.engine.guard.identity,
                                            tokens=tokens)
            try:
                yield Aggregate(cluster, front, mcp)
            finally:
                await mcp.stop()


@pytest.fixture
async def aggregate(tmp_path: Path) -> AsyncIterator[Aggregate]:
    async with aggregated(tmp_path) as started:
        yield started


def output(result: Any) -> dict[str, Any]:
    assert not result.is_error, result.content
    found: dict[str, Any] = result.structured_content or orjson.loads(result.content[0].text)
    return found


async def test_a_tool_call_reaches_the_runtime_as_the_proven_caller(
        aggregate: Aggregate) -> None:
    assert aggregate.mcp.url.startswith("https://")
    http, client = aggregate.client(aggregate.cluster.issue(ALICE))
    async with http, client:
        assert output(await client.call_tool("whoami", {}))["caller"] == caller_of(ALICE)


async def test_a_tool_call_is_refused_by_the_runtime_as_the_proven_caller(
        aggregate: Aggregate) -> None:
    writer = Workload("team-b", "writer")  # guarded's access names no such caller
    http, client = aggregate.client(aggregate.cluster.issue(writer))
    async with http, client:
        refused = await client.call_tool("guarded", {})
    assert refused.is_error
    text = refused.content[0].text  # type: ignore[union-attr]
    assert text.startswith("PERMISSION_DENIED: ")
    assert f"{caller_of(writer)} may not call capability 'guarded'" in text
    assert aggregate.cluster.counted("packetflow_access_denied_total", kind="capability",
                                     name="guarded", rule="allow") == 1


async def refusal(aggregate: Aggregate, files: IssuedFiles | None,
                  token: str | None = None) -> str:
    """The 401 body's reason for an MCP request presenting ``files`` (and ``token``)."""
    http, _ = aggregate.client(files, token)
    async with http:
        answer = await http.post(aggregate.mcp.url, json={
            "jsonrpc": "2.0", "id": 1, "method": "tools/list"},
            headers={"Accept": "application/json, text/event-stream"})
    assert answer.status_code == 401
    reason: str = answer.json()["error_description"]
    return reason


async def test_the_mcp_endpoint_refuses_a_caller_without_a_certificate(
        aggregate: Aggregate) -> None:
    assert await refusal(aggregate, None) == "the connection carries no client certificate"


async def test_the_mcp_endpoint_refuses_an_expired_certificate(aggregate: Aggregate) -> None:
    now = datetime.datetime.now(datetime.UTC)
    leaf = issue(aggregate.cluster.authority, ALICE.spiffe_id(DOMAIN),
                 not_before=now - datetime.timedelta(days=10),
                 valid_for=datetime.timedelta(days=9))
    assert (await refusal(aggregate, aggregate.cluster.write("expired", leaf))).startswith(
        "the certificate expired at")


async def test_the_mcp_endpoint_refuses_a_certificate_of_another_trust_domain(
        aggregate: Aggregate) -> None:
    leaf = issue(aggregate.cluster.authority,
                 SpiffeId.of("other.test", "ns", "team-a", "sa", "alice"),
                 check_trust_domain=False)
    reason = await refusal(aggregate, aggregate.cluster.write("forged", leaf))
    assert "no trust bundle for trust domain 'other.test'" in reason


async def test_the_mcp_endpoint_of_a_runtime_applies_access_itself(tmp_path: Path) -> None:
    authority = local_authority(tmp_path, DOMAIN)
    async with secure_runtime(tmp_path, authority, SERVER, MANIFESTS) as (server, files):
        assert server.engine.guard is not None
        mcp = await McpHttpServer.start(McpService.for_engine(server.engine),
                                        identity=server.engine.guard.identity)
        try:
            local = Aggregate(Cluster(tmp_path, authority, server, files), server, mcp)
            reporter = Workload("team-b", "reporter")
            http, client = local.client(local.cluster.issue(reporter))
            async with http, client:
                assert output(await client.call_tool("guarded", {}))["caller"] \
                    == caller_of(reporter)
            http, client = local.client(local.cluster.issue(Workload("team-b", "writer")))
            async with http, client:
                refused = await client.call_tool("guarded", {})
        finally:
            await mcp.stop()
    assert refused.is_error
    assert refused.content[0].text.startswith(  # type: ignore[union-attr]
        "PERMISSION_DENIED: spiffe://cluster.test/ns/team-b/sa/writer may not call")


async def test_the_mcp_endpoint_refuses_a_certificate_of_an_unknown_authority(
        aggregate: Aggregate) -> None:
    stranger = new_authority(DOMAIN, "stranger")  # same trust domain, another authority
    files = aggregate.cluster.write("stranger", issue(stranger, ALICE.spiffe_id(DOMAIN)))
    http, _ = aggregate.client(files)
    async with http:
        # TLS 1.3: the server refuses the certificate after the client finished its part.
        with pytest.raises(httpx2.TransportError):
            await http.post(aggregate.mcp.url, json={})


async def test_the_mcp_endpoint_presents_its_rotated_certificate(
        aggregate: Aggregate) -> None:
    cluster = aggregate.cluster
    identity = aggregate.runtime.engine.guard.identity  # type: ignore[union-attr]
    generation = identity.generation
    rotated = issue_files(cluster.authority, cluster.directory, AGGREGATE.service_account,
                          AGGREGATE, ip_addresses=("127.0.0.1",))
    await eventually(lambda: identity.generation > generation, timeout=30,
                     what="the aggregate to reload its certificate")
    alice = cluster.issue(ALICE)
    # A new handshake (in this event loop: the endpoint runs in it) sees the new certificate.
    context = client_context(load_credentials(alice.cert, alice.key), alice.ca.read_bytes())
    _, writer = await asyncio.open_connection("127.0.0.1", aggregate.mcp.port, ssl=context)
    served = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    await writer.wait_closed()
    assert x509.load_der_x509_certificate(served) \
        == x509.load_pem_x509_certificate(rotated.cert.read_bytes())
    http, client = aggregate.client(alice)
    async with http, client:  # and calls go on over it
        assert output(await client.call_tool("whoami", {}))["caller"] == caller_of(ALICE)
