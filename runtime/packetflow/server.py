"""The gRPC face of the runtime: servicers translate protobuf to and from the engine.

Domain errors become gRPC statuses in :func:`packetflow.rpc.abort_for` and nowhere else.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

import grpc
import orjson
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from packetflow.context import (
    CallContext,
)
from packetflow.contracts import contract_schema
from packetflow.engine import Engine
from packetflow.errors import (
    NotServable,
    PacketFlowError,
)
from packetflow.feedback import FeedbackService
from packetflow.graph import dependencies_of
from packetflow.health import plaintext_health_server
from packetflow.keepalive import SERVER_KEEPALIVE
from packetflow.planner.core import Planner
from packetflow.planner.handler import PLANNER_NAME
from packetflow.planner.wire import request_from_proto, response_to_proto
from packetflow.rpc import (
    ACTOR_SERVICE_NAME,
    ENVELOPE_BYTES,
    SERVICE_NAME,
    abort_for,
    proven_context,
    trace_metadata,
)
from packetflow.v1 import runtime_pb2, runtime_pb2_grpc

if TYPE_CHECKING:
    from packetflow.actors.runtime import ActorSystem
    from packetflow.actors.service import GrpcForwarder

log = logging.getLogger("packetflow.server")

T = TypeVar("T")


class CapabilityRuntimeServicer(runtime_pb2_grpc.CapabilityRuntimeServicer):
    """Translates ``packetflow.v1.CapabilityRuntime`` calls to the engine."""

    def __init__(self, engine: Engine, feedback: FeedbackService | None = None,
                 planner: Planner | None = None) -> None:
        self.engine = engine
        self.feedback = feedback
        self.planner = planner

    async def Invoke(self, request: runtime_pb2.InvokeRequest,
                     context: grpc.aio.ServicerContext) -> runtime_pb2.InvokeResponse:
        ctx = await proven_context(request.capability, context, self.engine.guard)
        try:
            output = await self.engine.invoke_json(request.capability, request.input_json, ctx)
        except PacketFlowError as exc:
            await abort_for(context, exc, ctx.trace_id, trace_metadata(ctx))
            raise  # unreachable: abort raises
        if trace := trace_metadata(ctx):
            context.set_trailing_metadata(trace)
        return runtime_pb2.InvokeResponse(output_json=output, trace_id=ctx.trace_id)

    async def InvokeStream(self, request: runtime_pb2.InvokeRequest,
                           context: grpc.aio.ServicerContext
                           ) -> AsyncIterator[runtime_pb2.InvokeEvent]:
        ctx = await proven_context(request.capability, context, self.engine.guard)
        try:
            async for event in progress_events(ctx, self.engine.invoke_json(
                    request.capability, request.input_json, ctx)):
                if isinstance(event, Done):
                    output = event.value
                else:
                    yield runtime_pb2.InvokeEvent(progress=event)
        except PacketFlowError as exc:
            await abort_for(context, exc, ctx.trace_id)
            raise
        yield runtime_pb2.InvokeEvent(
            result=runtime_pb2.InvokeResponse(output_json=output, trace_id=ctx.trace_id))

    async def ListCapabilities(self, request: runtime_pb2.ListCapabilitiesRequest,
                               context: grpc.aio.ServicerContext
                               ) -> runtime_pb2.ListCapabilitiesResponse:
        await proven_context("", context, self.engine.guard)
        return runtime_pb2.ListCapabilitiesResponse(capabilities=[
            runtime_pb2.CapabilitySummary(name=entry.name, intent=entry.capability.spec.intent,
                                          implementation=entry.capability.spec.implementation.kind)
            for entry in sorted(self.engine.served.values(), key=lambda e: e.name)
        ])

    async def DescribeCapability(self, request: runtime_pb2.DescribeCapabilityRequest,
                                 context: grpc.aio.ServicerContext
                                 ) -> runtime_pb2.CapabilityDescription:
        await proven_context(request.name, context, self.engine.guard)
        try:
            entry = self.engine.get(request.name)
        except PacketFlowError as exc:
            await abort_for(context, exc, "")
            raise
        spec = entry.capability.spec
        return runtime_pb2.CapabilityDescription(
            name=request.name, intent=spec.intent, implementation=spec.implementation.kind,
            requires_schema_json=orjson.dumps(contract_schema(spec.requires)),
            provides_schema_json=orjson.dumps(contract_schema(spec.provides)),
            effects=spec.effects, timeout_seconds=spec.timeout_seconds,
            concurrency=spec.concurrency, dependencies_json=orjson.dumps(
                [dep.to_json() for dep in dependencies_of(entry.capability)]))

    async def Feedback(self, request: runtime_pb2.FeedbackRequest,
                       context: grpc.aio.ServicerContext) -> runtime_pb2.FeedbackResponse:
        ctx = await proven_context(request.capability, context, self.engine.guard)
        try:
            if self.feedback is None:
                raise NotServable("this runtime keeps no feedback")
            if request.capability in self.engine.served:
                # Feedback about a capability is for those who may call it.
                self.engine.authorize(self.engine.get(request.capability), ctx)
            record = await self.feedback.record(request.trace_id, request.score,
                                                request.capability, request.comment)
        except PacketFlowError as exc:
            await abort_for(context, exc, request.trace_id)
            raise
        return runtime_pb2.FeedbackResponse(capability=record.capability)

    def _authorize_planning(self, ctx: CallContext) -> None:
        """Planning runs capabilities as this runtime (a deputy): with zero trust on, only
        callers the default policy admits may ask (there is no access spec to widen it)."""
        guard = self.engine.guard
        if guard is not None and ctx.principal is not None:
            guard.authorize("planner", PLANNER_NAME, None, ctx.principal)

    def _planner(self) -> Planner:
        if self.planner is None:
            raise NotServable("this runtime has no planner")
        return self.planner

    async def Plan(self, request: runtime_pb2.PlanRequest,
                   context: grpc.aio.ServicerContext) -> runtime_pb2.PlanResponse:
        ctx = await proven_context(PLANNER_NAME, context, self.engine.guard)
        try:
            self._authorize_planning(ctx)
            result = await self._planner().plan(request_from_proto(request))
        except PacketFlowError as exc:
            await abort_for(context, exc, "")
            raise
        return response_to_proto(result)

    async def PlanAndExecute(self, request: runtime_pb2.PlanRequest,
                             context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[runtime_pb2.PlanEvent]:
        ctx = await proven_context(PLANNER_NAME, context, self.engine.guard)
        try:
            self._authorize_planning(ctx)
        except PacketFlowError as exc:
            await abort_for(context, exc, ctx.trace_id)
        # Feedback naming only this trace id is recorded against the planner.
        self.engine.traces.served(ctx.trace_id, PLANNER_NAME)
        try:
            async for event in progress_events(ctx, self._planner().plan_and_execute(
                    request_from_proto(request), ctx)):
                if isinstance(event, Done):
                    result = event.value
                else:
                    yield runtime_pb2.PlanEvent(progress=event)
        except PacketFlowError as exc:
            await abort_for(context, exc, ctx.trace_id)
            raise
        yield runtime_pb2.PlanEvent(result=response_to_proto(result))


@dataclass
class Done(Generic[T]):
    """The result of the work :func:`progress_events` streamed progress of."""

    value: T


async def progress_events(ctx: CallContext, work: Awaitable[T]
                          ) -> AsyncIterator[runtime_pb2.Progress | Done[T]]:
    """Run ``work``, yielding the progress it reports through ``ctx``, then its result;
    if the consumer goes away, the work is cancelled."""
    events: asyncio.Queue[runtime_pb2.Progress | None] = asyncio.Queue()
    ctx.progress_sink = lambda message, fraction: events.put_nowait(
        runtime_pb2.Progress(message=message, fraction=fraction))
    call = asyncio.ensure_future(work)
    call.add_done_callback(lambda _: events.put_nowait(None))
    try:
        while (progress := await events.get()) is not None:
            yield progress
        yield Done(call.result())
    finally:
        call.cancel()  # the caller went away: stop the work too


@dataclass
class RuntimeServer:
    """A started gRPC runtime: the capability and actor services plus health and reflection."""

    engine: Engine
    server: grpc.aio.Server
    health: HealthServicer
    port: int
    actors: ActorSystem | None = None
    forwarder: GrpcForwarder | None = None  # placement's channels to the other members
    health_server: grpc.aio.Server | None = None  # plaintext health beside an mTLS port
    health_port: int | None = None
    token_port: int | None = None

    @classmethod
    async def start(cls, engine: Engine, address: str = "127.0.0.1:0",
                    actors: ActorSystem | None = None,
                    feedback: FeedbackService | None = None,
                    planner: Planner | None = None,
                    health_address: str | None = None,
                    token_address: str | None = None) -> RuntimeServer:
        """Bind ``address`` (port 0 picks a free one) and start serving; with ``actors``, the
        ``ActorRuntime`` service too; with ``feedback``, the ``Feedback`` call; with
        ``planner``, ``Plan`` and ``PlanAndExecute``. With ``engine.guard`` (zero trust) the
        port speaks mutual TLS only, and ``health_address`` serves ``grpc.health.v1`` alone
        in plaintext (the kubelet's gRPC probes cannot present a certificate), and
        ``token_address`` the same services over TLS without a client certificate, to callers
        proving themselves with ServiceAccount tokens (``engine.guard.tokens``)."""
        limit = engine.max_payload_bytes + ENVELOPE_BYTES
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
            *SERVER_KEEPALIVE,
        ])
        runtime_pb2_grpc.add_CapabilityRuntimeServicer_to_server(
            CapabilityRuntimeServicer(engine, feedback, planner), server)
        services = [SERVICE_NAME]
        forwarder = None
        if actors is not None:
            # Imported here: the actor servicer itself builds on this module.
            from packetflow.actors.service import ActorRuntimeServicer, attach
            from packetflow.v1 import actors_pb2_grpc

            actors_pb2_grpc.add_ActorRuntimeServicer_to_server(
                ActorRuntimeServicer(actors, engine), server)
            forwarder = attach(actors, engine.guard.identity if engine.guard else None)
            services.append(ACTOR_SERVICE_NAME)
        health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        reflection.enable_server_reflection((
            *services,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ), server)
        if engine.guard is not None:
            port = server.add_secure_port(address,
                                          engine.guard.identity.grpc_server_credentials())
        else:
            port = server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot listen on {address}")
        token_port = None
        if token_address is not None:
            if engine.guard is None or engine.guard.tokens is None:
                raise ValueError("a token port needs zero trust with a token reviewer")
            token_port = server.add_secure_port(token_address, engine.guard.identity.
                                                grpc_server_credentials(client_certificate=False))
            if token_port == 0:
                raise OSError(f"cannot listen on {token_address}")
        health_server, health_port = None, None
        if health_address is not None:
            health_server, health_port = await plaintext_health_server(health, health_address)
        await server.start()
        for service in ("", *services):
            await health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("runtime listening", extra={
            "address": address, "port": port, "capabilities": len(engine.served),
            "mtls": engine.guard is not None})
        return cls(engine, server, health, port, actors, forwarder, health_server, health_port,
                   token_port)

    async def stop(self, grace: float = 30.0, drain: float = 0.0) -> None:
        """Drain: report NOT_SERVING, keep serving ``drain`` seconds, then let calls finish."""
        services = ("", SERVICE_NAME, *((ACTOR_SERVICE_NAME,) if self.actors else ()))
        for service in services:
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        if drain:
            # Load balancers need time to see NOT_SERVING before new calls are refused.
            await asyncio.sleep(drain)
        await self.server.stop(grace)
        if self.health_server is not None:
            await self.health_server.stop(0)
        if self.forwarder is not None:
            await self.forwarder.close()

    async def wait(self) -> None:
        """Until the server has stopped."""
        await self.server.wait_for_termination()
