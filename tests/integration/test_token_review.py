"""Callers proven by projected ServiceAccount tokens, one case per test: a real grpc.aio
runtime with its token port (TLS, no client certificate), the kmock Kubernetes emulator over
HTTP answering TokenReview as the API server does."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest

from packetflow.identity.local import local_authority
from packetflow.identity.spiffe import Workload
from packetflow.identity.tokens import AUDIENCE, CACHE_ENTRIES, TokenReviewer
from packetflow.server import RuntimeServer
from packetflow.v1 import runtime_pb2, runtime_pb2_grpc
from tests.integration.test_zero_trust import DOMAIN, MANIFESTS, SERVER, caller_of, secure_runtime
from tests.operator.kube_emulator import ClusterEmulator, running_emulator

ALICE = Workload("team-a", "alice")


@dataclass
class TokenPort:
    emulator: ClusterEmulator
    server: RuntimeServer
    ca: Path

    async def call(self, token: str | None, capability: str = "whoami",
                   claimed: str | None = None) -> dict[str, Any]:
        """Invoke over TLS without a client certificate, the token as a bearer token."""
        return await invoke(f"127.0.0.1:{self.server.token_port}", self.ca.read_bytes(), token,
                            capability, claimed)

    async def refused(self, token: str | None) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await self.call(token)
        return caught.value

    def counted(self, reason: str) -> float:
        return self.server.engine.metrics.registry.get_sample_value(
            "packetflow_unauthenticated_calls_total", {"reason": reason}) or 0.0


async def invoke(address: str, ca: bytes, token: str | None, capability: str = "whoami",
                 claimed: str | None = None) -> dict[str, Any]:
    """Invoke over TLS without a client certificate (trusting ``ca``), ``token`` as the
    bearer token."""
    metadata = [("authorization", f"Bearer {token}")] if token else []
    if claimed:
        metadata.append(("packetflow-caller", claimed))
    credentials = grpc.ssl_channel_credentials(root_certificates=ca)
    async with grpc.aio.secure_channel(address, credentials) as channel:
        answer = await runtime_pb2_grpc.CapabilityRuntimeStub(channel).Invoke(
            runtime_pb2.InvokeRequest(capability=capability, input_json=b"{}"),
            timeout=30, metadata=metadata)
    found: dict[str, Any] = orjson.loads(answer.output_json)
    return found


@pytest.fixture
async def port(tmp_path: Path) -> AsyncIterator[TokenPort]:
    async with running_emulator() as (emulator, url):
        authority = local_authority(tmp_path, DOMAIN)
        async with secure_runtime(tmp_path, authority, SERVER, MANIFESTS,
                                  token_address="127.0.0.1:0",
                                  token_review_api=url) as (server, files):
            yield TokenPort(emulator, server, files.ca)
            assert server.engine.guard is not None and server.engine.guard.tokens is not None
            await server.engine.guard.tokens.aclose()


async def test_a_token_for_packetflow_proves_its_service_account(port: TokenPort) -> None:
    token = port.emulator.issue_token("team-a", "alice", [AUDIENCE])
    assert (await port.call(token))["caller"] == caller_of(ALICE)
    # The same caller as a certificate would prove: access applies to it.
    bob = port.emulator.issue_token("team-b", "bob", [AUDIENCE])
    error = await port.refused(bob)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details().startswith(f"{caller_of(Workload('team-b', 'bob'))} may not call")


async def test_a_token_for_another_audience_is_refused(port: TokenPort) -> None:
    token = port.emulator.issue_token("team-a", "alice", ["vault"])
    error = await port.refused(token)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "is invalid for the target audiences ['packetflow']" in error.details()
    assert port.counted("token-refused") == 1


async def test_an_expired_token_is_refused(port: TokenPort) -> None:
    token = port.emulator.issue_token("team-a", "alice", [AUDIENCE], expires_in=-60)
    error = await port.refused(token)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "Token has expired" in error.details()


async def test_a_call_without_a_token_is_refused(port: TokenPort) -> None:
    error = await port.refused(None)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == ("the call carries neither a client certificate nor a bearer "
                               "token")
    assert port.counted("no-credentials") == 1


async def test_a_token_callers_claimed_caller_is_ignored(port: TokenPort) -> None:
    token = port.emulator.issue_token("team-a", "alice", [AUDIENCE])
    admin = caller_of(Workload("team-a", "admin"))
    assert (await port.call(token, claimed=admin))["caller"] == caller_of(ALICE)


async def test_reviews_are_cached_until_the_token_expires(port: TokenPort) -> None:
    token = port.emulator.issue_token("team-a", "alice", [AUDIENCE], expires_in=30)
    for _ in range(3):
        assert (await port.call(token))["caller"] == caller_of(ALICE)
    assert port.emulator.token_reviews == 1
    # Past the token's exp claim the answer is not remembered: the API server is asked again
    # (and, the token having expired there too, refuses it).
    namespace, account, audiences, expiry = port.emulator.tokens[token]
    port.emulator.tokens[token] = (namespace, account, audiences, 0.0)
    reviewer = port.server.engine.guard.tokens  # type: ignore[union-attr]
    reviewer.clock = lambda: expiry + 1
    error = await port.refused(token)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert port.emulator.token_reviews == 2


async def test_the_review_cache_is_bounded() -> None:
    async with running_emulator() as (emulator, url):
        reviewer = TokenReviewer(url, DOMAIN)
        try:
            tokens = [emulator.issue_token("team-a", f"a{i}", [AUDIENCE])
                      for i in range(CACHE_ENTRIES + 1)]
            for token in tokens[:CACHE_ENTRIES]:
                reviewer._remember(token.encode(), (await reviewer.review(tokens[0])), 2e9)
            assert len(reviewer._cache) <= CACHE_ENTRIES
            await reviewer.review(tokens[-1])
            assert len(reviewer._cache) <= CACHE_ENTRIES
        finally:
            await reviewer.aclose()
