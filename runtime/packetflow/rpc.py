"""Where gRPC calls meet the transport-neutral core: an incoming call's metadata becomes a
:class:`~packetflow.context.CallContext`, and a domain error becomes a gRPC status here and
nowhere else. Every servicer (runtime, actors, gateway, federation) uses these.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from packetflow.composition.executor import TRACE_METADATA_KEY
from packetflow.context import (
    CALLER_KEY,
    EXECUTION_TRACE_KEY,
    IDEMPOTENCY_KEY,
    TRACE_ID_KEY,
    TRACEPARENT_KEY,
    WANT_TRACE_KEY,
    CallContext,
    traceparent_trace_id,
)
from packetflow.errors import (
    ContractViolation,
    InvalidInput,
    PacketFlowError,
    Unauthenticated,
    code_of,
)
from packetflow.v1 import actors_pb2, runtime_pb2

if TYPE_CHECKING:
    from packetflow.security import CallGuard

SERVICE_NAME = runtime_pb2.DESCRIPTOR.services_by_name["CapabilityRuntime"].full_name
ACTOR_SERVICE_NAME = actors_pb2.DESCRIPTOR.services_by_name["ActorRuntime"].full_name
# Room for the protobuf envelope around the JSON payload.
ENVELOPE_BYTES = 64 * 1024


def call_context(capability: str, context: grpc.aio.ServicerContext,
                 guard: CallGuard | None = None) -> CallContext:
    """Caller identity, trace id, deadline and idempotency key of an incoming call; with a
    ``guard`` (zero trust), the caller is the proven one (:class:`Unauthenticated` if none)."""
    trace_id = caller = idempotency_key = None
    wanted: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if key == WANT_TRACE_KEY:
            wanted[WANT_TRACE_KEY] = str(value)
        elif key == TRACE_ID_KEY:
            trace_id = str(value)
        elif key == CALLER_KEY:
            caller = str(value)
        elif key == TRACEPARENT_KEY and trace_id is None:
            trace_id = traceparent_trace_id(str(value))
        elif key == IDEMPOTENCY_KEY:
            idempotency_key = str(value)
    principal = None
    if guard is not None:
        principal = guard.principal(context, caller)
        caller = principal.caller
    remaining = context.time_remaining()
    deadline = None if remaining is None else asyncio.get_running_loop().time() + remaining
    return CallContext(capability=capability, trace_id=trace_id or os.urandom(16).hex(),
                       caller=caller, deadline=deadline, metadata=wanted,
                       idempotency_key=idempotency_key, principal=principal)


async def prove_context(name: str, context: grpc.aio.ServicerContext,
                        guard: CallGuard | None) -> CallContext:
    """:func:`call_context`, the caller proven by a certificate or (on the token port) a
    reviewed bearer token; :class:`Unauthenticated` when neither proves one."""
    if guard is None or guard.tokens is None:
        return call_context(name, context, guard)
    ctx = call_context(name, context)
    principal = await guard.prove(context, ctx.caller)
    ctx.caller, ctx.principal = principal.caller, principal
    return ctx


async def proven_context(name: str, context: grpc.aio.ServicerContext,
                         guard: CallGuard | None) -> CallContext:
    """:func:`prove_context`, ending the call UNAUTHENTICATED when the caller proves no
    identity."""
    try:
        return await prove_context(name, context, guard)
    except Unauthenticated as exc:
        await abort_for(context, exc, "")
        raise


def trace_metadata(ctx: CallContext) -> tuple[tuple[str, bytes], ...]:
    """The execution trace as trailing metadata, when the caller asked and there is one."""
    trace = ctx.metadata.get(TRACE_METADATA_KEY)
    if ctx.metadata.get(WANT_TRACE_KEY) != "1" or trace is None:
        return ()
    return ((EXECUTION_TRACE_KEY, trace.encode()),)


def rich_status(error: PacketFlowError) -> Any:
    """The ``grpc_status`` status for ``error``: code, message and the
    ``grpc-status-details-bin`` trailer (field violations as BadRequest details)."""
    code = code_of(error)
    status = status_pb2.Status(code=getattr(code_pb2, code.value), message=error.message)
    if isinstance(error, InvalidInput | ContractViolation):
        details = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in error.violations
        ])
        packed = any_pb2.Any()
        packed.Pack(details)
        status.details.append(packed)
    return rpc_status.to_status(status)


async def abort_for(context: grpc.aio.ServicerContext, error: PacketFlowError,
                    trace_id: str, extra: tuple[tuple[str, bytes], ...] = ()) -> None:
    """End the call with the status for ``error``; field violations go in BadRequest details."""
    rich = rich_status(error)
    await context.abort(rich.code, rich.details,
                        trailing_metadata=(*rich.trailing_metadata, (TRACE_ID_KEY, trace_id),
                                           *extra))
