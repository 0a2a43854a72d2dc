"""``implementation: {federated: {peer, capability}}``: a capability another organization
exports to us, served by a runtime through our federation gateway.

The gateway holds the certificates and does the checking, metering and auditing; this
handler calls the gateway's local port with the reference ``peer/capability``. When loaded
(``verify``) the manifest's declared contract is checked against the peer's, and checked
again whenever the gateway reports a new catalog version of that peer.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import grpc
import orjson

from packetflow.client import CallError, RuntimeClient
from packetflow.composition.remote import domain_error
from packetflow.context import TRACE_ID_KEY, CallContext
from packetflow.errors import NotServable
from packetflow.federation.catalog import check_compatible, contract_from_schema
from packetflow.spec import Capability
from packetflow.v1 import runtime_pb2

DEFAULT_GATEWAY = "127.0.0.1:8444"
ADDRESS_VARIABLE = "PACKETFLOW_FEDERATION_ADDRESS"
CATALOG_VERSION_KEY = "packetflow-catalog-version"  # the gateway's trailing metadata
log = logging.getLogger("packetflow.federation")


class FederatedCapability:
    """The handler of a federated capability (see the module docstring)."""

    def __init__(self, capability: Capability) -> None:
        impl = capability.spec.implementation.federated
        assert impl is not None
        self.capability = capability
        self.reference = f"{impl.peer}/{impl.capability}"
        self.address = impl.gateway or os.environ.get(ADDRESS_VARIABLE) or DEFAULT_GATEWAY
        self.client: RuntimeClient | None = None
        self.checked_version: str | None = None  # the catalog version last found compatible
        self.problem: str | None = None

    def _client(self) -> RuntimeClient:
        if self.client is None:
            self.client = RuntimeClient(self.address)
        return self.client

    async def verify(self, timeout: float) -> None:
        """Check the declared contract against the peer's; ImplementationError names the
        field. A gateway that cannot answer yet (not running, catalog not read) is no
        verdict: the check then runs before the first call."""
        from packetflow.validation import ImplementationError

        try:
            described = await self._describe(timeout)
        except CallError as exc:
            if exc.code == grpc.StatusCode.UNAVAILABLE:
                log.warning("%s: %s not checked yet (%s); checked at the first call",
                            self.capability.name, self.reference, exc)
                return
            raise ImplementationError(
                "spec.implementation.federated",
                f"{self.reference} via the federation gateway at {self.address}: "
                f"{exc}") from None
        problems = self._problems(described)
        if problems:
            path, message = problems[0]
            raise ImplementationError(f"spec.{path}", f"does not match {self.reference}: "
                                      f"{message}")

    async def _describe(self, timeout: float | None) -> dict[str, Any]:
        client = self._client()
        call = client.stub.DescribeCapability(
            runtime_pb2.DescribeCapabilityRequest(name=self.reference), timeout=timeout)
        try:
            described = await call
            trailing = await call.trailing_metadata()
        except grpc.aio.AioRpcError as exc:
            raise CallError.from_rpc_error(exc) from None
        self.checked_version = next((str(v) for k, v in trailing or ()
                                     if k == CATALOG_VERSION_KEY), None)
        return {"requires": orjson.loads(described.requires_schema_json),
                "provides": orjson.loads(described.provides_schema_json)}

    def _problems(self, described: dict[str, Any]) -> list[tuple[str, str]]:
        spec = self.capability.spec
        problems = check_compatible(spec.requires, spec.provides,
                                    contract_from_schema(described["requires"]),
                                    contract_from_schema(described["provides"]))
        self.problem = None if not problems else "; ".join(f"{p}: {m}" for p, m in problems)
        return problems

    async def __call__(self, value: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        """Call the peer's capability through the gateway."""
        if self.checked_version is None:  # never checked (the gateway was not up at load)
            try:
                self._problems(await self._describe(ctx.time_remaining()))
            except CallError as exc:
                raise domain_error(exc, self.reference, self.address) from None
        if self.problem is not None:
            raise NotServable(f"{self.capability.name}: the contract of {self.reference} no "
                              f"longer matches: {self.problem}")
        call = self._client().stub.Invoke(
            runtime_pb2.InvokeRequest(capability=self.reference, input_json=orjson.dumps(value)),
            timeout=ctx.time_remaining(), metadata=((TRACE_ID_KEY, ctx.trace_id),))
        try:
            response = await call
            trailing = await call.trailing_metadata()
        except grpc.aio.AioRpcError as exc:
            raise domain_error(CallError.from_rpc_error(exc), self.reference,
                               self.address) from None
        version = next((str(v) for k, v in trailing or () if k == CATALOG_VERSION_KEY), None)
        if version is not None and version != self.checked_version:
            # The peer's catalog changed since the last check: check again before trusting it.
            try:
                self._problems(await self._describe(ctx.time_remaining()))
            except CallError as exc:
                raise domain_error(exc, self.reference, self.address) from None
        result: dict[str, Any] = orjson.loads(response.output_json)
        return result

    async def aclose(self) -> None:
        """Close the channel to the gateway."""
        if self.client is not None:
            await self.client.close()
