"""The gRPC face of actors: ``packetflow.v1.ActorRuntime`` translated to the ``ActorSystem``.

Domain errors become statuses through ``server.abort_for`` (one error -> code map).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Collection
from typing import Any

import grpc
import orjson

from packetflow.actors.errors import ActorTypeNotFound
from packetflow.actors.runtime import ActorSystem, SendResult
from packetflow.contracts import contract_schema
from packetflow.engine import Engine
from packetflow.errors import (
    DeadlineExceeded,
    FieldViolation,
    HandlerFailed,
    InvalidInput,
    Overloaded,
    PacketFlowError,
    Unavailable,
)
from packetflow.graph import observed_dependencies
from packetflow.server import abort_for, call_context
from packetflow.v1 import actors_pb2, actors_pb2_grpc

SERVICE_NAME = actors_pb2.DESCRIPTOR.services_by_name["ActorRuntime"].full_name
DEFAULT_LIST_LIMIT = 1000
# Metadata marking a call one member forwarded to the owner (never forwarded again).
FORWARDED_KEY = "packetflow-forwarded"
FORWARD_DELETE_TIMEOUT = 10.0
# Channel closes in flight (strong references until they finish).
_closing: set[asyncio.Task[None]] = set()

log = logging.getLogger("packetflow.actors")


def _response(result: SendResult, trace_id: str) -> actors_pb2.SendResponse:
    return actors_pb2.SendResponse(reply_json=orjson.dumps(result.reply), trace_id=trace_id,
                                   version=result.version, duplicate=result.duplicate)


class ActorRuntimeServicer(actors_pb2_grpc.ActorRuntimeServicer):
    """Translates ``ActorRuntime`` calls to the actor system."""

    def __init__(self, system: ActorSystem, engine: Engine) -> None:
        self.system = system
        self.engine = engine

    def _decode(self, payload: bytes) -> Any:
        return self.engine.decode_input(payload)  # size limit and JSON errors, as for Invoke

    async def Send(self, request: actors_pb2.SendRequest,
                   context: grpc.aio.ServicerContext) -> actors_pb2.SendResponse:
        ctx = call_context(request.type, context)
        try:
            result = await self.system.get(request.type).send(
                request.id, self._decode(request.message_json), message_id=request.message_id,
                trace_id=ctx.trace_id, caller=ctx.caller, deadline=ctx.deadline,
                forwarded=request.forwarded)
        except PacketFlowError as exc:
            await abort_for(context, exc, ctx.trace_id)
            raise
        return _response(result, ctx.trace_id)

    async def Converse(self, request_iterator: AsyncIterator[actors_pb2.ConverseRequest],
                       context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[actors_pb2.ConverseEvent]:
        events: asyncio.Queue[actors_pb2.ConverseEvent | PacketFlowError | None] = \
            asyncio.Queue()
        subscription: tuple[Any, str, asyncio.Queue[dict[str, Any]]] | None = None
        pump: asyncio.Task[None] | None = None
        relay: asyncio.Task[None] | None = None

        async def read() -> None:
            nonlocal subscription, pump, relay
            actor_type = actor_id = ""
            try:
                async for request in request_iterator:
                    actor_type = actor_type or request.type
                    actor_id = actor_id or request.id
                    if not actor_type or not actor_id:
                        raise InvalidInput([FieldViolation(
                            "type" if not actor_type else "id",
                            "the first message of a conversation names the actor")])
                    kind = self.system.get(actor_type)
                    if subscription is None:
                        followups = kind.subscribe(actor_id)
                        subscription = (kind, actor_id, followups)
                        pump = asyncio.create_task(forward_followups(followups))
                        forwarder = self.system.forwarder
                        if kind.placement is not None and forwarder is not None:
                            # The owner may be another member: its follow-ups come here too.
                            relay = asyncio.create_task(kind.placement.relay_followups(
                                actor_id, followups, forwarder))
                    ctx = call_context(actor_type, context)
                    result = await kind.send(actor_id, self._decode(request.message_json),
                                             message_id=request.message_id,
                                             trace_id=ctx.trace_id, caller=ctx.caller)
                    events.put_nowait(actors_pb2.ConverseEvent(
                        reply=_response(result, ctx.trace_id)))
            except PacketFlowError as exc:
                events.put_nowait(exc)
                return
            except Exception:  # the stream must end, never hang on a dead reader
                log.exception("conversation with %s/%s failed", actor_type, actor_id)
                events.put_nowait(HandlerFailed(f"conversation with {actor_type}/{actor_id} "
                                                "failed; see the runtime log"))
                return
            events.put_nowait(None)

        async def forward_followups(queue: asyncio.Queue[dict[str, Any]]) -> None:
            while True:
                followup = await queue.get()
                events.put_nowait(actors_pb2.ConverseEvent(followup_json=orjson.dumps(followup)))

        reader = asyncio.create_task(read())
        try:
            while (event := await events.get()) is not None:
                if isinstance(event, PacketFlowError):
                    await abort_for(context, event, "")
                    return
                yield event
        finally:
            reader.cancel()
            for task in (pump, relay):
                if task is not None:
                    task.cancel()
            if subscription is not None:
                kind, actor_id, queue = subscription
                kind.unsubscribe(actor_id, queue)

    async def ListActors(self, request: actors_pb2.ListActorsRequest,
                         context: grpc.aio.ServicerContext) -> actors_pb2.ListActorsResponse:
        try:
            kind = self.system.get(request.type)
            records = await kind.list_actors(request.limit or DEFAULT_LIST_LIMIT, request.after)
        except PacketFlowError as exc:
            await abort_for(context, exc, "")
            raise
        return actors_pb2.ListActorsResponse(actors=[
            actors_pb2.ActorSummary(id=r.actor_id, version=r.version, updated_at=r.updated_at,
                                    active=r.actor_id in kind.active) for r in records])

    async def GetActor(self, request: actors_pb2.GetActorRequest,
                       context: grpc.aio.ServicerContext) -> actors_pb2.ActorDescription:
        try:
            described = await self.system.get(request.type).describe(request.id)
        except PacketFlowError as exc:
            await abort_for(context, exc, "")
            raise
        return actors_pb2.ActorDescription(
            type=request.type, id=request.id, state_json=orjson.dumps(described["state"]),
            memory_json=orjson.dumps(described["memory"]),
            reminders_json=orjson.dumps(described["reminders"]),
            version=described["version"], epoch=described["epoch"], active=described["active"])

    async def DeleteActor(self, request: actors_pb2.DeleteActorRequest,
                          context: grpc.aio.ServicerContext) -> actors_pb2.DeleteActorResponse:
        forwarded = any(key == FORWARDED_KEY for key, _ in context.invocation_metadata() or ())
        try:
            deleted = await self.system.get(request.type).delete(request.id, forwarded=forwarded)
        except PacketFlowError as exc:
            await abort_for(context, exc, "")
            raise
        return actors_pb2.DeleteActorResponse(deleted=deleted)

    async def Followups(self, request: actors_pb2.FollowupsRequest,
                        context: grpc.aio.ServicerContext
                        ) -> AsyncIterator[actors_pb2.ConverseEvent]:
        try:
            kind = self.system.get(request.type)
        except PacketFlowError as exc:
            await abort_for(context, exc, "")
            raise
        queue = kind.subscribe(request.id)
        try:
            while True:
                followup = await queue.get()
                yield actors_pb2.ConverseEvent(followup_json=orjson.dumps(followup))
        finally:
            kind.unsubscribe(request.id, queue)

    async def ListActorTypes(self, request: actors_pb2.ListActorTypesRequest,
                             context: grpc.aio.ServicerContext
                             ) -> actors_pb2.ListActorTypesResponse:
        return actors_pb2.ListActorTypesResponse(types=[
            actors_pb2.ActorTypeSummary(name=name, intent=kind.spec.intent)
            for name, kind in sorted(self.system.types.items())])

    async def DescribeActorType(self, request: actors_pb2.DescribeActorTypeRequest,
                                context: grpc.aio.ServicerContext
                                ) -> actors_pb2.ActorTypeDescription:
        try:
            kind = self.system.get(request.name)
        except PacketFlowError as exc:
            await abort_for(context, exc, "")
            raise
        spec = kind.spec
        return actors_pb2.ActorTypeDescription(
            name=request.name, intent=spec.intent,
            requires_schema_json=orjson.dumps(contract_schema(spec.requires)),
            provides_schema_json=orjson.dumps(contract_schema(spec.provides)),
            effects=spec.effects, timeout_seconds=spec.timeout_seconds, replicas=spec.replicas,
            dependencies_json=orjson.dumps([dep.to_json() for dep in observed_dependencies(
                kind.actor, kind.called)]))


class GrpcForwarder:
    """Forwards a message to the member that owns the actor, one channel per member."""

    def __init__(self) -> None:
        self.channels: dict[str, grpc.aio.Channel] = {}

    def _stub(self, address: str) -> actors_pb2_grpc.ActorRuntimeStub:
        channel = self.channels.get(address)
        if channel is None:
            channel = self.channels[address] = grpc.aio.insecure_channel(address)
        return actors_pb2_grpc.ActorRuntimeStub(channel)

    async def send(self, address: str, actor_type: str, actor_id: str,
                   message: dict[str, Any], message_id: str | None, trace_id: str,
                   timeout: float | None) -> SendResult:
        """Send with ``forwarded`` set, so the owner never forwards it again."""
        stub = self._stub(address)
        request = actors_pb2.SendRequest(type=actor_type, id=actor_id,
                                         message_json=orjson.dumps(message),
                                         message_id=message_id or "", forwarded=True)
        try:
            response = await stub.Send(request, timeout=timeout,
                                       metadata=(("packetflow-trace-id", trace_id),))
        except grpc.aio.AioRpcError as exc:
            raise forwarded_error(exc) from None
        return SendResult(orjson.loads(response.reply_json), response.version,
                          response.duplicate)

    async def delete(self, address: str, actor_type: str, actor_id: str) -> bool:
        """DeleteActor at the owner, marked forwarded so it is not forwarded again."""
        request = actors_pb2.DeleteActorRequest(type=actor_type, id=actor_id)
        try:
            response = await self._stub(address).DeleteActor(
                request, timeout=FORWARD_DELETE_TIMEOUT, metadata=((FORWARDED_KEY, "1"),))
        except grpc.aio.AioRpcError as exc:
            raise forwarded_error(exc) from None
        return bool(response.deleted)

    async def followups(self, address: str, actor_type: str,
                        actor_id: str) -> AsyncIterator[dict[str, Any]]:
        """The follow-ups the member at ``address`` makes for the actor, as they happen."""
        stream = self._stub(address).Followups(
            actors_pb2.FollowupsRequest(type=actor_type, id=actor_id))
        try:
            async for event in stream:
                yield orjson.loads(event.followup_json)
        except grpc.aio.AioRpcError as exc:
            raise forwarded_error(exc) from None
        finally:
            stream.cancel()

    def retain(self, addresses: Collection[str]) -> None:
        """Close the channels to members that left (any address not in ``addresses``)."""
        for address in [a for a in self.channels if a not in addresses]:
            channel = self.channels.pop(address)
            task = asyncio.get_running_loop().create_task(channel.close())
            _closing.add(task)
            task.add_done_callback(_closing.discard)

    async def close(self) -> None:
        """Close every channel."""
        for channel in self.channels.values():
            await channel.close()
        self.channels.clear()


class _NotFoundAtOwner(ActorTypeNotFound):
    """NOT_FOUND as the owning member reported it."""

    def __init__(self, message: str) -> None:
        PacketFlowError.__init__(self, message)
        self.name = ""


def forwarded_error(error: grpc.aio.AioRpcError) -> PacketFlowError:
    """The owner's status as a domain error, so the caller sees the same code."""
    message = f"owner replied: {error.details() or ''}"
    code = error.code()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidInput([FieldViolation("message", message)])
    if code == grpc.StatusCode.NOT_FOUND:
        return _NotFoundAtOwner(message)
    kinds: dict[grpc.StatusCode, type[PacketFlowError]] = {
        grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
        grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
        grpc.StatusCode.INTERNAL: HandlerFailed,
    }
    return kinds.get(code, Unavailable)(message)


def attach(system: ActorSystem) -> GrpcForwarder:
    """Give the system a gRPC forwarder (placement); close it on shutdown."""
    forwarder = GrpcForwarder()
    system.forwarder = forwarder
    return forwarder


