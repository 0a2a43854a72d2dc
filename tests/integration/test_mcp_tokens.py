"""The MCP endpoint's ServiceAccount tokens, one case per test: the official MCP client over
HTTPS without a client certificate, its projected token reviewed by TokenReview on the kmock
Kubernetes emulator over HTTP, the aggregate forwarding each tool call as the proven caller to
a real runtime serving mutual TLS."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import ValidationError

from packetflow.identity.spiffe import Workload
from packetflow.identity.tokens import AUDIENCE, TokenReviewer
from packetflow.settings import RuntimeSettings
from tests.integration.test_mcp_zero_trust import Aggregate, aggregated, output, refusal
from tests.integration.test_zero_trust import DOMAIN, caller_of
from tests.operator.kube_emulator import ClusterEmulator, running_emulator

ALICE = Workload("team-a", "alice")


@dataclass
class TokenAggregate:
    emulator: ClusterEmulator
    aggregate: Aggregate

    def token(self, workload: Workload = ALICE, audiences: tuple[str, ...] = (AUDIENCE,),
              expires_in: float = 3600.0) -> str:
        return self.emulator.issue_token(workload.namespace, workload.service_account,
                                         audiences, expires_in)


@pytest.fixture
async def front(tmp_path: Path) -> AsyncIterator[TokenAggregate]:
    async with running_emulator() as (emulator, url), \
            aggregated(tmp_path, TokenReviewer(url, DOMAIN)) as aggregate:
        yield TokenAggregate(emulator, aggregate)


async def test_a_tool_call_with_a_token_runs_as_its_service_account(
        front: TokenAggregate) -> None:
    http, client = front.aggregate.client(None, front.token())
    async with http, client:
        assert output(await client.call_tool("whoami", {}))["caller"] == caller_of(ALICE)
        # The runtime behind the aggregate authorizes that caller as itself.
        refused = await client.call_tool("guarded", {})
    assert refused.is_error
    assert f"{caller_of(ALICE)} may not call capability 'guarded'" in \
        refused.content[0].text  # type: ignore[union-attr]


async def test_the_mcp_endpoint_refuses_a_token_for_another_audience(
        front: TokenAggregate) -> None:
    reason = await refusal(front.aggregate, None, front.token(audiences=("vault",)))
    assert "is invalid for the target audiences ['packetflow']" in reason


async def test_the_mcp_endpoint_refuses_an_expired_token(front: TokenAggregate) -> None:
    assert "Token has expired" in await refusal(front.aggregate, None,
                                                front.token(expires_in=-60))


async def test_the_mcp_endpoint_refuses_a_request_with_neither_certificate_nor_token(
        front: TokenAggregate) -> None:
    assert await refusal(front.aggregate, None) == \
        "the request carries neither a client certificate nor a bearer token"


async def test_a_client_certificate_decides_over_a_token(front: TokenAggregate) -> None:
    cluster = front.aggregate.cluster
    reviews = front.emulator.token_reviews
    bob = front.token(Workload("team-b", "bob"))
    http, client = front.aggregate.client(cluster.issue(ALICE), bob)
    async with http, client:
        assert output(await client.call_tool("whoami", {}))["caller"] == caller_of(ALICE)
    assert front.emulator.token_reviews == reviews  # the token was not even looked at


def test_a_static_mcp_token_and_service_account_tokens_exclude_each_other(
        tmp_path: Path) -> None:
    files = {name: tmp_path / name for name in ("tls_cert", "tls_key", "tls_ca")}
    with pytest.raises(ValidationError, match="both use Authorization: Bearer: set one"):
        RuntimeSettings(mcp_token="secret", mcp_token_review=True, **files)
    with pytest.raises(ValidationError, match="PACKETFLOW_MCP_TOKEN_REVIEW\\) needs the TLS"):
        RuntimeSettings(mcp_token_review=True)
