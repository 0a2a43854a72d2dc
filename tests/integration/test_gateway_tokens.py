"""The gateway's token listener, one case per test: callers without certificates proving
themselves per call with projected ServiceAccount tokens (TLS, no client certificate), checked
by TokenReview on the kmock Kubernetes emulator over HTTP, forwarded over mutual TLS to a real
grpc.aio runtime that authorizes them as themselves."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest

from packetflow.cli import build_parser
from packetflow.gateway.routes import parse_routes
from packetflow.gateway.server import GatewayServer
from packetflow.identity.local import IssuedFiles, issue_files, local_authority
from packetflow.identity.spiffe import Workload
from packetflow.identity.tokens import AUDIENCE, TokenReviewer
from packetflow.identity.workload import WorkloadIdentity
from packetflow.server import RuntimeServer
from packetflow.v1 import runtime_pb2, runtime_pb2_grpc
from tests.integration.test_gateway_zero_trust import GATEWAY, routes_to
from tests.integration.test_token_review import invoke
from tests.integration.test_zero_trust import (
    DOMAIN,
    MANIFESTS,
    SERVER,
    Cluster,
    caller_of,
    secure_runtime,
)
from tests.operator.kube_emulator import ClusterEmulator, running_emulator
from tests.support.processes import free_port, gateway_process

ALICE = Workload("team-a", "alice")


@dataclass
class TokenFront:
    """The emulator, a runtime serving mTLS only, and a gateway with a token listener."""

    emulator: ClusterEmulator
    cluster: Cluster
    gateway: GatewayServer
    files: IssuedFiles  # the gateway's own

    @property
    def token_address(self) -> str:
        assert self.gateway.token_listener is not None
        return f"127.0.0.1:{self.gateway.token_listener.port}"

    def token(self, workload: Workload = ALICE, audiences: tuple[str, ...] = (AUDIENCE,),
              expires_in: float = 3600.0) -> str:
        return self.emulator.issue_token(workload.namespace, workload.service_account,
                                         audiences, expires_in)

    async def call(self, token: str | None, capability: str = "whoami",
                   claimed: str | None = None) -> dict[str, Any]:
        return await invoke(self.token_address, self.files.ca.read_bytes(), token, capability,
                            claimed)

    async def refused(self, token: str | None) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await self.call(token)
        return caught.value

    def refusals(self, reason: str) -> float:
        return self.gateway.table.metrics.registry.get_sample_value(
            "packetflow_gateway_unauthenticated_calls_total", {"reason": reason}) or 0.0

    def served(self) -> float:
        """Calls the runtime behind the gateway ran (any outcome)."""
        return calls_served(self.cluster.server)


def calls_served(server: RuntimeServer) -> float:
    """Capability calls a runtime ran (any outcome)."""
    registry = server.engine.metrics.registry
    return sum(sample.value for metric in registry.collect()
               if metric.name == "packetflow_capability_calls"
               for sample in metric.samples if sample.name.endswith("_total"))


@pytest.fixture
async def front(tmp_path: Path) -> AsyncIterator[TokenFront]:
    async with running_emulator() as (emulator, url):
        authority = local_authority(tmp_path, DOMAIN)
        async with secure_runtime(tmp_path, authority, SERVER, MANIFESTS,
                                  trusted_forwarders=[caller_of(GATEWAY)]) as (server, files):
            cluster = Cluster(tmp_path, authority, server, files)
            own = issue_files(authority, tmp_path, GATEWAY.service_account, GATEWAY,
                              ip_addresses=("127.0.0.1",))
            gateway = await GatewayServer.start(
                "127.0.0.1:0", routes=parse_routes(routes_to(cluster.address), "test"),
                identity=WorkloadIdentity(own.cert, own.key, own.ca),
                token_address="127.0.0.1:0", tokens=TokenReviewer(url, DOMAIN))
            try:
                yield TokenFront(emulator, cluster, gateway, own)
            finally:
                await gateway.stop(grace=1)


async def test_a_token_for_packetflow_proves_its_caller_through_the_gateway(
        front: TokenFront) -> None:
    assert (await front.call(front.token()))["caller"] == caller_of(ALICE)
    # The runtime authorizes the token's caller as itself: the default policy refuses bob.
    bob = Workload("team-b", "bob")
    error = await front.refused(front.token(bob))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details().startswith(f"{caller_of(bob)} may not call")
    # Later calls with a known token are decided from the cache: one review per token.
    await front.call(front.token(Workload("team-a", "carol")))
    before = front.emulator.token_reviews
    token = front.token()
    for _ in range(3):
        assert (await front.call(token))["caller"] == caller_of(ALICE)
    assert front.emulator.token_reviews == before + 1


async def test_a_streaming_call_waits_for_its_tokens_review(front: TokenFront) -> None:
    # A token not reviewed yet: the stream's frames are held, then relayed as its caller.
    credentials = grpc.ssl_channel_credentials(root_certificates=front.files.ca.read_bytes())
    async with grpc.aio.secure_channel(front.token_address, credentials) as channel:
        events = [event async for event in runtime_pb2_grpc.CapabilityRuntimeStub(
            channel).InvokeStream(runtime_pb2.InvokeRequest(capability="whoami",
                                                            input_json=b"{}"),
                                  timeout=30,
                                  metadata=[("authorization", f"Bearer {front.token()}")])]
    assert orjson.loads(events[-1].result.output_json)["caller"] == caller_of(ALICE)
    assert front.emulator.token_reviews == 1


async def test_the_gateway_refuses_a_token_for_another_audience(front: TokenFront) -> None:
    error = await front.refused(front.token(audiences=("vault",)))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "is invalid for the target audiences ['packetflow']" in error.details()
    assert front.refusals("token-refused") == 1
    assert front.served() == 0


async def test_the_gateway_refuses_an_expired_token(front: TokenFront) -> None:
    error = await front.refused(front.token(expires_in=-60))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "Token has expired" in error.details()
    assert front.refusals("token-refused") == 1
    assert front.served() == 0


async def test_the_gateway_refuses_a_call_without_a_token(front: TokenFront) -> None:
    error = await front.refused(None)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details().startswith("the call carries no bearer token")
    assert front.refusals("no-credentials") == 1
    assert front.served() == 0
    # A refusal remembered by the reviewer is answered at once, as the first was.
    forged = "not-a-token"
    for _ in range(2):
        assert (await front.refused(forged)).code() == grpc.StatusCode.UNAUTHENTICATED
    assert front.refusals("token-refused") == 2


async def test_a_token_callers_claimed_caller_is_replaced(front: TokenFront) -> None:
    admin = caller_of(Workload("team-a", "admin"))
    assert (await front.call(front.token(), claimed=admin))["caller"] == caller_of(ALICE)


async def test_the_callers_token_is_not_forwarded(tmp_path: Path) -> None:
    async with running_emulator() as (emulator, url):
        authority = local_authority(tmp_path, DOMAIN)
        backend = issue_files(authority, tmp_path, SERVER.service_account, SERVER,
                              ip_addresses=("127.0.0.1",))
        recorder = MetadataRecorder()
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([recorder.handler()])
        port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
            [(backend.key.read_bytes(), backend.cert.read_bytes())],
            root_certificates=backend.ca.read_bytes(), require_client_auth=True))
        await server.start()
        own = issue_files(authority, tmp_path, GATEWAY.service_account, GATEWAY,
                          ip_addresses=("127.0.0.1",))
        gateway = await GatewayServer.start(
            "127.0.0.1:0", routes=parse_routes(routes_to(f"127.0.0.1:{port}"), "test"),
            identity=WorkloadIdentity(own.cert, own.key, own.ca),
            token_address="127.0.0.1:0", tokens=TokenReviewer(url, DOMAIN))
        try:
            assert gateway.token_listener is not None
            token = emulator.issue_token("team-a", "alice", [AUDIENCE])
            await invoke(f"127.0.0.1:{gateway.token_listener.port}", own.ca.read_bytes(), token)
        finally:
            await gateway.stop(grace=1)
            await server.stop(0)
    [seen] = recorder.calls
    assert seen["packetflow-caller"] == caller_of(ALICE)
    assert "authorization" not in seen
    assert token not in " ".join(map(str, seen.values()))


@dataclass
class MetadataRecorder:
    """A backend answering Invoke with ``{}`` and keeping each call's metadata."""

    calls: list[dict[str, str]] = field(default_factory=list)

    def handler(self) -> grpc.GenericRpcHandler:
        async def invoke(request: runtime_pb2.InvokeRequest,
                         context: grpc.aio.ServicerContext) -> runtime_pb2.InvokeResponse:
            self.calls.append({k: str(v) for k, v in context.invocation_metadata() or ()})
            return runtime_pb2.InvokeResponse(output_json=b"{}")

        return grpc.method_handlers_generic_handler("packetflow.v1.CapabilityRuntime", {
            "Invoke": grpc.unary_unary_rpc_method_handler(
                invoke, request_deserializer=runtime_pb2.InvokeRequest.FromString,
                response_serializer=runtime_pb2.InvokeResponse.SerializeToString)})


async def test_the_gateway_process_serves_tokens_on_its_token_address(
        tmp_path: Path, front: TokenFront) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(routes_to(front.cluster.address))
    port, token_port = free_port(), free_port()
    own = front.files
    log = tmp_path / "gateway.log"
    review_api = str(front.gateway.token_listener.calls.reviewer.api)  # type: ignore[union-attr]
    process = gateway_process(routes, log, port, args=[
        "--cert", str(own.cert), "--key", str(own.key), "--ca", str(own.ca),
        "--token-address", f"127.0.0.1:{token_port}", "--token-review-api", review_api])
    try:
        assert f"ServiceAccount tokens on port {token_port}" in log.read_text()
        answer = await invoke(f"127.0.0.1:{token_port}", own.ca.read_bytes(), front.token())
        assert answer["caller"] == caller_of(ALICE)
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_the_gateway_names_a_token_address_without_tls_files(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text("capabilities: {}")
    args = build_parser().parse_args(["gateway", "--routes", str(routes), "--token-address",
                                      "127.0.0.1:0"])
    assert args.func(args) == 2
    assert "error: token_address (PACKETFLOW_TOKEN_ADDRESS) needs the TLS files" \
        in capsys.readouterr().err
