"""Calls to capabilities in other runtimes: one cached channel per address."""

from __future__ import annotations

from typing import Any

import grpc
import orjson

from packetflow.client import CallError, RuntimeClient
from packetflow.composition.resolve import ServiceResolver
from packetflow.context import CALLER_KEY, TRACE_ID_KEY, CallContext
from packetflow.errors import (
    CapabilityNotFound,
    DeadlineExceeded,
    FieldViolation,
    HandlerFailed,
    InvalidInput,
    NotServable,
    Overloaded,
    PacketFlowError,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from packetflow.keepalive import CHANNEL_KEEPALIVE
from packetflow.v1 import runtime_pb2


class RemoteCaller:
    """Call capabilities at ``host:port`` addresses or Kubernetes Services, reusing one
    channel per target.

    Deadline, trace id and caller identity of the child context travel with each call.
    """

    def __init__(self, options: list[tuple[str, Any]] | None = None,
                 resolver: ServiceResolver | None = None) -> None:
        self.options = [*CHANNEL_KEEPALIVE, *(options or [])]
        self.resolver = resolver or ServiceResolver()
        self.clients: dict[str, RuntimeClient] = {}

    def client(self, address: str) -> RuntimeClient:
        """The cached client for ``address`` (channels connect lazily)."""
        found = self.clients.get(address)
        if found is None:
            found = self.clients[address] = RuntimeClient(address, options=self.options)
        return found

    async def __call__(self, address: str, name: str, value: dict[str, Any],
                       ctx: CallContext) -> dict[str, Any]:
        """Invoke ``name`` at ``address``; failures become domain errors with their code."""
        metadata = [(TRACE_ID_KEY, ctx.trace_id)]
        if ctx.caller:
            metadata.append((CALLER_KEY, ctx.caller))
        request = runtime_pb2.InvokeRequest(capability=name, input_json=orjson.dumps(value))
        target = await self.resolver.resolve(address)
        try:
            # Per-call metadata: RuntimeClient.invoke fixes the caller per client, and one
            # cached channel serves calls on behalf of many callers.
            response = await self.client(target).stub.Invoke(
                request, timeout=ctx.time_remaining(), metadata=tuple(metadata))
        except grpc.aio.AioRpcError as exc:
            raise domain_error(CallError.from_rpc_error(exc), name, address) from None
        result: dict[str, Any] = orjson.loads(response.output_json)
        return result

    async def close(self) -> None:
        """Close every cached channel."""
        clients, self.clients = self.clients, {}
        for client in clients.values():
            await client.close()


def domain_error(error: CallError, name: str, address: str) -> PacketFlowError:
    """The domain error (and so the status code) a failed remote call is reported with."""
    where = f"{name!r} at {address}: {error.message}"
    code = error.code
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidInput(error.violations or [FieldViolation("input", error.message)])
    if code == grpc.StatusCode.NOT_FOUND:
        found = CapabilityNotFound(name)
        found.message = f"capability {where}"
        return found
    kinds: dict[grpc.StatusCode, type[PacketFlowError]] = {
        grpc.StatusCode.UNAVAILABLE: Unavailable,
        grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
        grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
        grpc.StatusCode.FAILED_PRECONDITION: NotServable,
        grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
        grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    }
    return kinds.get(code, HandlerFailed)(f"remote {code.name}: {where}")
