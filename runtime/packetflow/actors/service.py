"""The gRPC face of actors: ``packetflow.v1.ActorRuntime`` translated to the ``ActorSystem``.

Domain errors become statuses through ``rpc.abort_for`` (one error -> code map).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Collection
from typing import Any

import grpc
import orjson

from packetflow.actors.active import SendResult
from packetflow.actors.errors import ActorTypeNotFound
from packetflow.actors.runtime import ActorSystem, ActorType
from packetflow.client import close_in_background
from packetflow.context import CALLER_KEY, TRACE_ID_KEY, CallContext
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
from packetflow.identity.workload import WorkloadIdentity
from packetflow.rpc import abort_for, prove_context, proven_context
from packetflow.v1 import actors_pb2, actors_pb2_grpc

SERVICE_NAME = actors_pb2.DESCRIPTOR.services_by_name["ActorRuntime"].full_name
DEFAULT_LIST_LIMIT = 1000
# Metadata marking a call one member forwarded to the owner (never forwarded again).
FORWARDED_KEY = "packetflow-forwarded"
FORWARD_DELETE_TIMEOUT = 10.0
# Calls on channels opened before a certificate rotation get this long to finish.
ROTATION_GRACE = 60.0

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

    def _kind(self, name: str, ctx: CallContext) -> ActorType:
        """The actor type, once its access policy admits the proven caller (if any)."""
        kind = self.system.get(name)
        guard = self.engine.guard
        if guard is not None and ctx.principal is not None:
            guard.authorize("actor", name, kind.spec.access, ctx.principal)
        return kind

    async def Send(self, request: actors_pb2.SendRequest,
                   context: grpc.aio.ServicerContext) -> actors_pb2.SendResponse:
        ctx = await proven_context(request.type, context, self.engine.guard)
        try:
            result = await self._kind(request.type, ctx).send(
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
                    ctx = await prove_context(actor_type, context, self.engine.guard)
                    kind = self._kind(actor_type, ctx)
                    if subscription is None:
                        followups = kind.subscribe(actor_id)
                        subscription = (kind, actor_id, followups)
                        pump = asyncio.create_task(forward_followups(followups))
                        forwarder = self.system.forwarder
                        if kind.placement is not None and forwarder is not None:
                            # The owner may be another member: its follow-ups come here too.
                            relay = asyncio.create_task(kind.placement.relay_followups(
                                actor_id, followups, forwarder))
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
        ctx = await proven_context(request.type, context, self.engine.guard)
        try:
            kind = self._kind(request.type, ctx)
            records = await kind.list_actors(request.limit or DEFAULT_LIST_LIMIT, request.after)
        except PacketFlowError as exc:
            await abort_for(context, exc, "")
            raise
        return actors_pb2.ListActorsResponse(actors=[
            actors_pb2.ActorSummary(id=r.actor_id, version=r.version, updated_at=r.updated_at,
                                    active=r.actor_id in kind.active) for r in records])

    async def GetActor(self, request: actors_pb2.GetActorRequest,
                       context: grpc.aio.ServicerContext) -> actors_pb2.ActorDescription:
        ctx = await proven_context(request.type, context, self.engine.guard)
        try:
            described = await self._kind(request.type, ctx).describe(request.id)
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
        ctx = await proven_context(request.type, context, self.engine.guard)
        try:
            deleted = await self._kind(request.type, ctx).delete(request.id,
                                                                 forwarded=forwarded)
        except PacketFlowError as exc:
            await abort_for(context, exc, "")
            raise
        return actors_pb2.DeleteActorResponse(deleted=deleted)

    async def Followups(self, request: actors_pb2.FollowupsRequest,
                        context: grpc.aio.ServicerContext
                        ) -> AsyncIterator[actors_pb2.ConverseEvent]:
        ctx = await proven_context(request.type, context, self.engine.guard)
        try:
            kind = self._kind(request.type, ctx)
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
        await proven_context("", context, self.engine.guard)
        return actors_pb2.ListActorTypesResponse(types=[
            actors_pb2.ActorTypeSummary(name=name, intent=kind.spec.intent)
            for name, kind in sorted(self.system.types.items())])

    async def DescribeActorType(self, request: actors_pb2.DescribeActorTypeRequest,
                                context: grpc.aio.ServicerContext
                                ) -> actors_pb2.ActorTypeDescription:
        await proven_context(request.name, context, self.engine.guard)
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
    """Forwards a message to the member that owns an actor, one channel per member; with the
    workload's ``identity``, over mutual TLS, new channels after each certificate rotation."""

    def __init__(self, identity: WorkloadIdentity | None = None) -> None:
        self.identity = identity
        self.channels: dict[str, grpc.aio.Channel] = {}
        self._generation = 0

    def _stub(self, address: str) -> actors_pb2_grpc.ActorRuntimeStub:
        identity = self.identity
        if identity is not None and identity.generation != self._generation:
            self._generation = identity.generation
            for channel in self.channels.values():
                close_in_background(channel, ROTATION_GRACE)
            self.channels.clear()
        channel = self.channels.get(address)
        if channel is None:
            channel = self.channels[address] = (
                grpc.aio.insecure_channel(address) if identity is None else
                grpc.aio.secure_channel(address, identity.current().grpc_channel_credentials))
        return actors_pb2_grpc.ActorRuntimeStub(channel)

    async def send(self, address: str, actor_type: str, actor_id: str,
                   message: dict[str, Any], message_id: str | None, trace_id: str,
                   timeout: float | None, caller: str | None = None) -> SendResult:
        """Send with ``forwarded`` set, so the owner never forwards it again; the owner (our
        own workload, so a trusted forwarder) sees ``caller`` as the caller."""
        stub = self._stub(address)
        request = actors_pb2.SendRequest(type=actor_type, id=actor_id,
                                         message_json=orjson.dumps(message),
                                         message_id=message_id or "", forwarded=True)
        metadata = [(TRACE_ID_KEY, trace_id)]
        if caller:
            metadata.append((CALLER_KEY, caller))
        try:
            response = await stub.Send(request, timeout=timeout, metadata=tuple(metadata))
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
            close_in_background(self.channels.pop(address))

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


def attach(system: ActorSystem, identity: WorkloadIdentity | None = None) -> GrpcForwarder:
    """Give the system a gRPC forwarder (placement); close it on shutdown."""
    forwarder = GrpcForwarder(identity)
    system.forwarder = forwarder
    return forwarder


