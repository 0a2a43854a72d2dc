"""Calls to capabilities in other runtimes: one cached channel per address.

With zero trust on, calls go over mutual TLS as this workload (its own certificate), never as
the caller it serves: the called runtime authorizes this workload. Only a process that
forwards calls for others (the MCP aggregate, ``forward_caller``) names its caller, which
the called runtime believes because this workload is one of its trusted forwarders.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc
import orjson

from packetflow.client import CallError, RuntimeClient, close_in_background
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

if TYPE_CHECKING:
    from packetflow.identity.workload import WorkloadIdentity

# Calls on channels opened before a certificate rotation get this long to finish.
ROTATION_GRACE = 60.0


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
        self.identity: WorkloadIdentity | None = None
        self.forward_caller = False
        self._generation = 0

    def secure(self, identity: WorkloadIdentity, forward_caller: bool = False) -> None:
        """Call over mutual TLS as ``identity`` from now on; ``forward_caller``: this process
        forwards calls for others and names each call's caller (a trusted forwarder)."""
        self.identity, self.forward_caller = identity, forward_caller
        self._generation = -1  # channels made before are plaintext: replace them

    def client(self, address: str) -> RuntimeClient:
        """The cached client for ``address`` (channels connect lazily); after our certificate
        rotated, new channels, while calls on the old ones finish."""
        identity = self.identity
        if identity is not None and identity.generation != self._generation:
            self._generation = identity.generation
            for old in self.clients.values():
                close_in_background(old.channel, ROTATION_GRACE)
            self.clients.clear()
        found = self.clients.get(address)
        if found is None:
            found = self.clients[address] = RuntimeClient(
                address, options=self.options,
                credentials=identity.current().grpc_channel_credentials if identity else None)
        return found

    async def __call__(self, address: str, name: str, value: dict[str, Any],
                       ctx: CallContext) -> dict[str, Any]:
        """Invoke ``name`` at ``address``; failures become domain errors with their code."""
        metadata = [(TRACE_ID_KEY, ctx.trace_id)]
        # Without zero trust the caller's name travels (unverified, as it came); with it, only
        # a forwarder names the caller: everyone else calls as itself.
        if ctx.caller and (self.identity is None or self.forward_caller):
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
