"""An async client for the runtime: used by the CLI, by tests and by remote composition steps."""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import orjson

from packetflow.context import CALLER_KEY, EXECUTION_TRACE_KEY, TRACE_ID_KEY, WANT_TRACE_KEY
from packetflow.errors import FieldViolation
from packetflow.v1 import actors_pb2, actors_pb2_grpc, runtime_pb2, runtime_pb2_grpc

# Execution traces of large compositions ride in trailing metadata; gRPC's default is 8 KiB.
MAX_METADATA_BYTES = 4 * 1024 * 1024
# Channels being closed in the background (strong references until they finish).
_closing: set[asyncio.Task[None]] = set()


def close_in_background(channel: grpc.aio.Channel, grace: float | None = None) -> None:
    """Close ``channel`` without waiting for it; calls in flight on it get ``grace`` seconds
    (None: as long as they take) to finish."""
    task = asyncio.get_running_loop().create_task(channel.close(grace))
    _closing.add(task)
    task.add_done_callback(_closing.discard)


class TlsFilesError(Exception):
    """A ``--cert``/``--key``/``--ca`` file that cannot be read."""


def tls_credentials(cert: Path | None, key: Path | None,
                    ca: Path | None) -> grpc.ChannelCredentials | None:
    """Mutual TLS credentials from PEM files (``packetflow call --cert/--key/--ca``): our
    certificate and key, and the authorities the runtime's certificate must chain to. None
    when no file is given; :class:`TlsFilesError` names a missing one or an unreadable one.
    Only bytes are read here: the client stays as light as the CLI needs it."""
    given = {"--cert": cert, "--key": key, "--ca": ca}
    if all(path is None for path in given.values()):
        return None
    missing = [flag for flag, path in given.items() if path is None]
    if missing:
        raise TlsFilesError(f"mutual TLS needs --cert, --key and --ca; missing "
                            f"{', '.join(missing)}")
    data: dict[str, bytes] = {}
    for flag, path in given.items():
        assert path is not None
        try:
            data[flag] = path.read_bytes()
        except OSError as exc:
            raise TlsFilesError(f"{flag} {path}: {exc.strerror}") from None
    return grpc.ssl_channel_credentials(root_certificates=data["--ca"],
                                        private_key=data["--key"],
                                        certificate_chain=data["--cert"])


@dataclass
class CallError(Exception):
    """A call that ended with a non-OK status, with its field violations when there were any."""

    code: grpc.StatusCode
    message: str
    violations: list[FieldViolation] = field(default_factory=list)
    trace_id: str | None = None
    execution_trace: dict[str, Any] | None = None

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    @classmethod
    def from_rpc_error(cls, error: grpc.aio.AioRpcError) -> CallError:
        """Unpack a gRPC error, including ``google.rpc.BadRequest`` details."""
        # Imported on the error path only: the CLI's start-up pays for what it uses.
        from google.rpc import error_details_pb2
        from grpc_status import rpc_status

        trailing = error.trailing_metadata() or ()
        trace_id = next((str(v) for k, v in trailing if k == TRACE_ID_KEY), None)
        violations: list[FieldViolation] = []
        status = rpc_status.from_call(error)
        for detail in status.details if status is not None else ():
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations.extend(FieldViolation(v.field, v.description)
                                  for v in bad.field_violations)
        return cls(error.code(), error.details() or "", violations, trace_id,
                   _execution_trace(trailing))


def _execution_trace(trailing: Any) -> dict[str, Any] | None:
    raw = next((v for k, v in trailing or () if k == EXECUTION_TRACE_KEY), None)
    return None if raw is None else orjson.loads(raw)


@dataclass(frozen=True)
class ProgressEvent:
    """A progress event of a streaming call."""

    message: str
    fraction: float


@dataclass(frozen=True)
class ActorEvent:
    """An event of a conversation: a ``reply`` to a message, or a ``followup``."""

    kind: str
    message: dict[str, Any]


class RuntimeClient:
    """One channel to one runtime address; reuse it for many calls."""

    def __init__(self, address: str, *, caller: str | None = None,
                 options: list[tuple[str, Any]] | None = None,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self.address = address
        self.caller = caller
        options = [("grpc.max_metadata_size", MAX_METADATA_BYTES), *(options or [])]
        # With credentials: mutual TLS (the runtime's certificate must name the dialled host).
        self.channel = (grpc.aio.secure_channel(address, credentials, options=options)
                        if credentials is not None
                        else grpc.aio.insecure_channel(address, options=options))
        self.stub = runtime_pb2_grpc.CapabilityRuntimeStub(self.channel)
        self.actors = actors_pb2_grpc.ActorRuntimeStub(self.channel)

    async def __aenter__(self) -> RuntimeClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel."""
        await self.channel.close()

    def _metadata(self, trace_id: str | None,
                  want_trace: bool = False) -> tuple[tuple[str, str], ...]:
        pairs = [(WANT_TRACE_KEY, "1")] if want_trace else []
        if trace_id:
            pairs.append((TRACE_ID_KEY, trace_id))
        if self.caller:
            pairs.append((CALLER_KEY, self.caller))
        return tuple(pairs)

    async def invoke_raw(self, name: str, payload: bytes, *, timeout: float | None = None,
                         trace_id: str | None = None,
                         wait_for_ready: bool = False) -> runtime_pb2.InvokeResponse:
        """Invoke with a JSON payload as bytes; returns the protobuf response.

        ``wait_for_ready`` waits (within ``timeout``) for a runtime that is still starting
        instead of failing fast with UNAVAILABLE.
        """
        request = runtime_pb2.InvokeRequest(capability=name, input_json=payload)
        try:
            response: runtime_pb2.InvokeResponse = await self.stub.Invoke(
                request, timeout=timeout, wait_for_ready=wait_for_ready,
                metadata=self._metadata(trace_id))
            return response
        except grpc.aio.AioRpcError as exc:
            raise CallError.from_rpc_error(exc) from None

    async def invoke(self, name: str, value: Any, *, timeout: float | None = None,
                     trace_id: str | None = None, wait_for_ready: bool = False) -> dict[str, Any]:
        """Invoke ``name`` with ``value`` (JSON-able); returns the output object."""
        response = await self.invoke_raw(name, orjson.dumps(value), timeout=timeout,
                                         trace_id=trace_id, wait_for_ready=wait_for_ready)
        result: dict[str, Any] = orjson.loads(response.output_json)
        return result

    async def invoke_traced(self, name: str, value: Any, *, timeout: float | None = None,
                            wait_for_ready: bool = False
                            ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Invoke and also return the execution trace (compositions; ``None`` otherwise).

        On failure the trace is on the raised CallError as ``execution_trace``.
        """
        request = runtime_pb2.InvokeRequest(capability=name, input_json=orjson.dumps(value))
        call = self.stub.Invoke(request, timeout=timeout, wait_for_ready=wait_for_ready,
                                metadata=self._metadata(None, want_trace=True))
        try:
            response = await call
            trailing = await call.trailing_metadata()
        except grpc.aio.AioRpcError as exc:
            raise CallError.from_rpc_error(exc) from None
        return orjson.loads(response.output_json), _execution_trace(trailing)

    async def invoke_stream(
        self, name: str, value: Any, *, timeout: float | None = None,
        on_progress: Callable[[ProgressEvent], None] | None = None, wait_for_ready: bool = False,
    ) -> dict[str, Any]:
        """Invoke with progress events delivered to ``on_progress``; returns the output."""
        request = runtime_pb2.InvokeRequest(capability=name, input_json=orjson.dumps(value))
        response = await _progress_then_result(self.stub.InvokeStream(
            request, timeout=timeout, wait_for_ready=wait_for_ready,
            metadata=self._metadata(None)), on_progress)
        result: dict[str, Any] = orjson.loads(response.output_json)
        return result

    async def list(self) -> list[runtime_pb2.CapabilitySummary]:
        """The capabilities the runtime serves."""
        try:
            response = await self.stub.ListCapabilities(runtime_pb2.ListCapabilitiesRequest())
        except grpc.aio.AioRpcError as exc:
            raise CallError.from_rpc_error(exc) from None
        return list(response.capabilities)

    async def describe(self, name: str) -> dict[str, Any]:
        """One capability's contract, intent and effects as plain data."""
        try:
            d = await self.stub.DescribeCapability(runtime_pb2.DescribeCapabilityRequest(name=name))
        except grpc.aio.AioRpcError as exc:
            raise CallError.from_rpc_error(exc) from None
        return {
            "name": d.name, "intent": d.intent, "implementation": d.implementation,
            "requires": orjson.loads(d.requires_schema_json),
            "provides": orjson.loads(d.provides_schema_json),
            "effects": list(d.effects), "timeoutSeconds": d.timeout_seconds,
            "concurrency": d.concurrency,
            "dependencies": orjson.loads(d.dependencies_json or b"[]"),
        }

    async def feedback(self, trace_id: str, score: float, *, capability: str = "",
                       comment: str = "") -> str:
        """Record a satisfaction score (0..1) for the call ``trace_id``; returns the
        capability the runtime recorded it against ("" when it could not tell)."""
        request = runtime_pb2.FeedbackRequest(trace_id=trace_id, score=score,
                                              capability=capability, comment=comment)
        try:
            response = await self.stub.Feedback(request, metadata=self._metadata(None))
        except grpc.aio.AioRpcError as exc:
            raise CallError.from_rpc_error(exc) from None
        return str(response.capability)

    async def plan(self, intent: str, value: Any = None, *, allow_effects: bool = False,
                   capabilities: builtins.list[str] | None = None, planner: str = "",
                   use_cache: bool = True, timeout: float | None = None) -> dict[str, Any]:
        """A checked plan for ``intent`` over ``value``'s fields (nothing runs): the plan
        manifest, explanation, planner and, when effects hold it back, ``blocked``."""
        try:
            response = await self.stub.Plan(
                _plan_request(intent, value, allow_effects, capabilities, planner, use_cache),
                timeout=timeout, metadata=self._metadata(None))
        except grpc.aio.AioRpcError as exc:
            raise CallError.from_rpc_error(exc) from None
        return _plan_result(response)

    async def plan_and_execute(
        self, intent: str, value: Any = None, *, allow_effects: bool = False,
        capabilities: builtins.list[str] | None = None, planner: str = "",
        use_cache: bool = True, timeout: float | None = None,
        on_progress: Callable[[ProgressEvent], None] | None = None,
    ) -> dict[str, Any]:
        """Plan and run: as :meth:`plan`, plus ``executed``, ``results``, ``trace``,
        ``traceId`` and (when the plan failed) ``error``; progress goes to ``on_progress``."""
        request = _plan_request(intent, value, allow_effects, capabilities, planner, use_cache)
        return _plan_result(await _progress_then_result(self.stub.PlanAndExecute(
            request, timeout=timeout, metadata=self._metadata(None)), on_progress))

    # ------------------------------------------------------------------------ actors

    async def send(self, actor_type: str, actor_id: str, message: Any, *,
                   message_id: str | None = None, timeout: float | None = None,
                   wait_for_ready: bool = False) -> dict[str, Any]:
        """Send a message to an actor; returns its reply (sent after the state committed).

        With ``message_id``, a retry of an unacknowledged message is applied at most once.
        """
        request = actors_pb2.SendRequest(type=actor_type, id=actor_id,
                                         message_json=orjson.dumps(message),
                                         message_id=message_id or "")
        try:
            response = await self.actors.Send(request, timeout=timeout,
                                              wait_for_ready=wait_for_ready,
                                              metadata=self._metadata(None))
        except grpc.aio.AioRpcError as exc:
            raise CallError.from_rpc_error(exc) from None
        reply: dict[str, Any] = orjson.loads(response.reply_json)
        return reply

    async def converse(self, actor_type: str, actor_id: str,
                       messages: AsyncIterator[Any]) -> AsyncIterator[ActorEvent]:
        """A multi-turn session: yields each reply in order and any follow-up the actor sends
        on its own (``on_idle``) while the stream is open."""
        async def requests() -> AsyncIterator[actors_pb2.ConverseRequest]:
            async for message in messages:
                yield actors_pb2.ConverseRequest(type=actor_type, id=actor_id,
                                                 message_json=orjson.dumps(message))

        try:
            async for event in self.actors.Converse(requests(), metadata=self._metadata(None)):
                if event.HasField("reply"):
                    yield ActorEvent("reply", orjson.loads(event.reply.reply_json))
                else:
                    yield ActorEvent("followup", orjson.loads(event.followup_json))
        except grpc.aio.AioRpcError as exc:
            raise CallError.from_rpc_error(exc) from None

    async def list_actors(self, actor_type: str, *, limit: int = 0,
                          after: str = "") -> builtins.list[dict[str, Any]]:
        """The actors of a type with committed state: id, version, updatedAt, active."""
        try:
            response = await self.actors.ListActors(actors_pb2.ListActorsRequest(
                type=actor_type, limit=limit, after=after))
        except grpc.aio.AioRpcError as exc:
            raise CallError.from_rpc_error(exc) from None
        return [{"id": a.id, "version": a.version, "updatedAt": a.updated_at,
                 "active": a.active} for a in response.actors]

    async def get_actor(self, actor_type: str, actor_id: str) -> dict[str, Any]:
        """An actor's committed state, memory summary and reminders."""
        try:
            d = await self.actors.GetActor(actors_pb2.GetActorRequest(type=actor_type,
                                                                      id=actor_id))
        except grpc.aio.AioRpcError as exc:
            raise CallError.from_rpc_error(exc) from None
        return {"state": orjson.loads(d.state_json), "memory": orjson.loads(d.memory_json),
                "reminders": orjson.loads(d.reminders_json), "version": d.version,
                "active": d.active}

    async def list_actor_types(self) -> builtins.list[actors_pb2.ActorTypeSummary]:
        """The actor types the runtime serves."""
        try:
            response = await self.actors.ListActorTypes(actors_pb2.ListActorTypesRequest())
        except grpc.aio.AioRpcError as exc:
            raise CallError.from_rpc_error(exc) from None
        return list(response.types)

    async def describe_actor_type(self, name: str) -> dict[str, Any]:
        """One actor type's message contract, intent and effects as plain data."""
        try:
            d = await self.actors.DescribeActorType(
                actors_pb2.DescribeActorTypeRequest(name=name))
        except grpc.aio.AioRpcError as exc:
            raise CallError.from_rpc_error(exc) from None
        return {
            "name": d.name, "kind": "actor", "intent": d.intent,
            "requires": orjson.loads(d.requires_schema_json),
            "provides": orjson.loads(d.provides_schema_json),
            "effects": list(d.effects), "timeoutSeconds": d.timeout_seconds,
            "replicas": d.replicas, "dependencies": orjson.loads(d.dependencies_json or b"[]"),
        }

    async def delete_actor(self, actor_type: str, actor_id: str) -> bool:
        """Delete an actor; False when it did not exist."""
        try:
            response = await self.actors.DeleteActor(actors_pb2.DeleteActorRequest(
                type=actor_type, id=actor_id))
        except grpc.aio.AioRpcError as exc:
            raise CallError.from_rpc_error(exc) from None
        return bool(response.deleted)


async def _progress_then_result(events: Any,
                                on_progress: Callable[[ProgressEvent], None] | None) -> Any:
    """Deliver a stream's progress events; return its one result event's ``result``."""
    try:
        async for event in events:
            if not event.HasField("progress"):
                return event.result
            if on_progress is not None:
                on_progress(ProgressEvent(event.progress.message, event.progress.fraction))
    except grpc.aio.AioRpcError as exc:
        raise CallError.from_rpc_error(exc) from None
    raise CallError(grpc.StatusCode.INTERNAL, "stream ended without a result")


def _plan_request(intent: str, value: Any, allow_effects: bool,
                  capabilities: list[str] | None, planner: str,
                  use_cache: bool) -> runtime_pb2.PlanRequest:
    return runtime_pb2.PlanRequest(
        intent=intent, input_json=orjson.dumps({} if value is None else value),
        allow_effects=allow_effects, capabilities=capabilities or [], planner=planner,
        no_cache=not use_cache)


def _plan_result(response: runtime_pb2.PlanResponse) -> dict[str, Any]:
    """A plan response as plain data (the shape the CLI and MCP tools print)."""
    out: dict[str, Any] = {"plan": orjson.loads(response.plan_json),
                           "planner": response.planner,
                           "explanation": orjson.loads(response.explanation_json or b"{}"),
                           "executed": response.executed}
    if response.blocked:
        out["blocked"] = response.blocked
    if response.executed:
        out["traceId"] = response.trace_id
        out["results"] = orjson.loads(response.results_json) if response.results_json \
            else None
        out["trace"] = orjson.loads(response.trace_json) if response.trace_json else None
    if response.error_code:
        out["error"] = {"code": response.error_code, "message": response.error_message}
    return out
