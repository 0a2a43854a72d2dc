"""The federation gateway's data path: peers' calls read straight off their mTLS connections
by the gateway's HTTP/2 machinery (:mod:`packetflow.gateway.h2`), and each admitted
``Invoke`` passed to the local runtime with its request message untouched.

Why not a ``grpc.aio`` server behind the TLS terminator: every call was decoded and
re-encoded twice (server, then client) and every byte relayed once more in Python between
the terminator and the server; here a call costs one HTTP/2 parse per hop. The gateway reads
only the request's capability and JSON input (for the checks, the audit's size and hash, the
probe), and the runtime's answer (its output contract, price, hash); nothing reaches the
runtime before :meth:`Gateway.admit_inbound` let it through.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError

from packetflow.client import CallError
from packetflow.composition.remote import domain_error
from packetflow.context import CALLER_KEY, TRACE_ID_KEY
from packetflow.errors import FieldViolation, InvalidInput, PacketFlowError
from packetflow.gateway.grpcwire import (
    CONTENT_TYPE,
    RESPONSE_HEADERS,
    WireError,
    format_timeout,
    frame_message,
    single_message,
    status_of,
    status_trailers,
    trailers_only,
)
from packetflow.gateway.h2 import (
    CANCEL,
    CONNECTION_LOST,
    REFUSED_STREAM,
    Connection,
    Headers,
    Stream,
    StreamRefused,
)
from packetflow.gateway.policy import CANCELLED, DEADLINE_EXCEEDED, INTERNAL, OK, UNAVAILABLE
from packetflow.gateway.proxy import Buffered, CallHeaders, Relay, UnaryFront, read_headers
from packetflow.gateway.upstream import ConnectFailed, Upstream
from packetflow.identity import terminator
from packetflow.v1 import federation_pb2, runtime_pb2

if TYPE_CHECKING:
    from packetflow.federation.gateway import Gateway, Inbound

log = logging.getLogger("packetflow.federation")

_FEDERATION = "/packetflow.v1.Federation/"
PEER_INVOKE = f"{_FEDERATION}Invoke".encode()
PEER_CATALOG = f"{_FEDERATION}GetCatalog".encode()
RUNTIME_INVOKE = b"/packetflow.v1.CapabilityRuntime/Invoke"
STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}
_TRACE = TRACE_ID_KEY.encode()
_CALLER = CALLER_KEY.encode()
_DETAILS = b"grpc-status-details-bin"
MAX_MESSAGE_BYTES = 4 * 1024 * 1024 + 64 * 1024  # a 4 MiB payload and its envelope


class Reply:
    """A unary call's answer from an upstream: its status, message and trailers."""

    __slots__ = ("body", "code", "message", "trailers")

    def __init__(self, code: int, message: str, body: bytes = b"",
                 trailers: Headers | None = None) -> None:
        self.code = code
        self.message = message
        self.body = body
        self.trailers = trailers or []


class Exchange:
    """One unary call on an upstream HTTP/2 stream, its answer buffered whole."""

    __slots__ = ("answered", "chunks", "future", "stream")

    def __init__(self) -> None:
        self.future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self.stream: Stream | None = None
        self.chunks: list[bytes] = []
        self.answered = False

    def on_headers(self, headers: Headers, end_stream: bool) -> None:
        """Response headers, then trailers (or trailers alone)."""
        if not end_stream:
            self.answered = True
            return
        code, message = status_of(headers)
        self._end(Reply(code, message, b"".join(self.chunks), headers))

    def on_data(self, data: bytes, end_stream: bool) -> None:
        """Response bytes."""
        self.chunks.append(data)
        if self.stream is not None:
            self.stream.consumed(len(data))
        if end_stream:
            self._end(Reply(INTERNAL, "the runtime ended the call without a status"))

    def on_reset(self, code: int, refused: bool) -> None:
        """The stream or its connection failed."""
        lost = refused or code in (CONNECTION_LOST, REFUSED_STREAM)
        self._end(Reply(UNAVAILABLE if lost else CANCELLED if code == CANCEL else INTERNAL,
                        "the runtime is unreachable" if lost else "the runtime reset the call"))

    def expire(self) -> None:
        """The caller's deadline passed."""
        self._end(Reply(DEADLINE_EXCEEDED, "deadline exceeded (at the federation gateway)"))

    def _end(self, reply: Reply) -> None:
        if not self.future.done():
            self.future.set_result(reply)


async def unary(upstream: Upstream, headers: Headers, body: bytes,
                timeout: float | None) -> Reply:
    """One unary call on ``upstream``'s shared connection (DEADLINE_EXCEEDED after
    ``timeout``; a cancelled caller cancels the stream)."""
    exchange = Exchange()
    try:
        stream = upstream.stream(exchange) or (await upstream.connect()).open_stream(exchange)
    except (ConnectFailed, StreamRefused) as exc:
        return Reply(UNAVAILABLE, str(exc))
    exchange.stream = stream
    stream.send_headers(headers)
    stream.send_data(body, end_stream=True)
    # A timer, not asyncio.timeout: no cancellation scope per call.
    timer = None if timeout is None else asyncio.get_running_loop().call_later(
        timeout, exchange.expire)
    try:
        return await exchange.future
    finally:
        if timer is not None:
            timer.cancel()
        if stream.open:  # expired or cancelled: the runtime may stop working on it
            stream.reset(CANCEL)


async def invoke(upstream: Upstream, path: bytes, body: bytes, metadata: Headers,
                 deadline: float | None) -> tuple[bytes, CallError | None]:
    """One Invoke (``body``: a framed InvokeRequest) with ``metadata`` and the remaining
    deadline (event-loop time); its output JSON, or the error it ended with."""
    headers = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path),
               (b":authority", upstream.authority), (b"content-type", CONTENT_TYPE),
               (b"te", b"trailers"), *metadata]
    remaining = None
    if deadline is not None:
        remaining = deadline - asyncio.get_running_loop().time()
        headers.append((b"grpc-timeout", format_timeout(remaining)))
    reply = await unary(upstream, headers, body, remaining)
    if reply.code == OK:
        try:
            return runtime_pb2.InvokeResponse.FromString(
                single_message(reply.body, None)).output_json, None
        except (WireError, DecodeError) as exc:
            reply = Reply(INTERNAL, f"the answer is unreadable: {exc}")
    return b"", call_error(reply)


def call_error(reply: Reply) -> CallError:
    """A failed reply as the client library reports it (BadRequest details included)."""
    from google.rpc import error_details_pb2, status_pb2

    violations: list[FieldViolation] = []
    trace_id = None
    for name, value in reply.trailers:
        if name == _TRACE:
            trace_id = value.decode(errors="replace")
        elif name == _DETAILS:
            with contextlib.suppress(ValueError, DecodeError):
                status = status_pb2.Status.FromString(
                    base64.b64decode(value + b"=" * (-len(value) % 4)))
                for detail in status.details:
                    if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                        bad = error_details_pb2.BadRequest()
                        detail.Unpack(bad)
                        violations.extend(FieldViolation(v.field, v.description)
                                          for v in bad.field_violations)
    return CallError(STATUS_CODES.get(reply.code, grpc.StatusCode.UNKNOWN), reply.message,
                     violations, trace_id)


def error_trailers(error: PacketFlowError, trace_id: str) -> Headers:
    """A whole error answer for ``error``, as :func:`packetflow.server.abort_for` gives it."""
    from packetflow.server import rich_status

    rich = rich_status(error)
    extra = [(name.encode(), value if isinstance(value, bytes) else value.encode())
             for name, value in rich.trailing_metadata]
    extra = [(name, base64.b64encode(value).rstrip(b"=") if name == _DETAILS else value)
             for name, value in extra]
    return trailers_only(rich.code.value[0], rich.details, [*extra, (_TRACE, trace_id.encode())])


class _Running:
    """A call's task, cancelled when its caller goes away."""

    __slots__ = ("task",)

    def __init__(self, task: asyncio.Task[None]) -> None:
        self.task = task

    def cancelled(self) -> None:
        """The caller reset the stream."""
        self.task.cancel()


def answer(stream: Stream, output: bytes, trace_id: str,
           extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
    """A successful Invoke's whole answer."""
    stream.send_headers(RESPONSE_HEADERS)
    stream.send_data(frame_message(runtime_pb2.InvokeResponse(
        output_json=output, trace_id=trace_id).SerializeToString()))
    stream.send_headers(status_trailers(OK, "", [(_TRACE, trace_id.encode()), *extra]),
                        end_stream=True)


def read_invoke(body: bytes, headers: CallHeaders) -> runtime_pb2.InvokeRequest:
    """A unary Invoke's request (InvalidInput when it is not one)."""
    try:
        return runtime_pb2.InvokeRequest.FromString(single_message(body, headers.encoding))
    except (WireError, DecodeError) as exc:
        raise InvalidInput([FieldViolation("request", str(exc) or "not protobuf")]) from None


class Front:
    """What both data paths share: unary requests buffered whole (:class:`Buffered`), each
    call a task of its own, the gateway's own refusals, and a clean stop."""

    def __init__(self, gateway: Gateway, max_message: int = MAX_MESSAGE_BYTES) -> None:
        self.gateway = gateway
        self.max_message = max_message
        self._tasks: set[asyncio.Task[None]] = set()

    def buffer(self, front: UnaryFront, stream: Stream, call: CallHeaders,
               end_stream: bool) -> Buffered:
        """Collect a unary request for ``front``."""
        handler = Buffered(front, stream, call)
        if end_stream:
            handler.on_data(b"", True)
        return handler

    def refuse(self, stream: Stream, headers: CallHeaders, code: int, message: str) -> None:
        """Answer a call with a status of the gateway's own."""
        stream.send_headers(trailers_only(code, message, [(_TRACE, headers.trace_id.encode())]),
                            end_stream=True)

    def spawn(self, work: Coroutine[Any, Any, None]) -> _Running:
        """Run a call's ``work`` (cancelled if its caller goes away)."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return _Running(task)

    async def cancel_calls(self) -> None:
        """Cancel the calls in flight (shutdown)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class PeerConnection:
    """The calls of one authenticated peer connection."""

    def __init__(self, calls: PeerCalls, identity: Inbound) -> None:
        self.calls = calls
        self.identity = identity
        self.max_message = calls.max_message
        self.refuse = calls.refuse

    def on_request(self, stream: Stream, headers: Headers, end_stream: bool) -> Any:
        """Buffer a Federation call; anything else is UNIMPLEMENTED."""
        call = read_headers(headers, asyncio.get_running_loop().time())
        if call.path not in (PEER_INVOKE, PEER_CATALOG):
            self.refuse(stream, call, 12, f"method {call.path.decode(errors='replace')} "
                                          "is not served to peers")
            return _Ignored()
        return self.calls.buffer(self, stream, call, end_stream)

    def unary(self, stream: Stream, headers: CallHeaders, body: bytes) -> _Running:
        """Run a complete request's call in a task of its own."""
        return self.calls.spawn(
            self.calls.invoke(self.identity, stream, headers, body)
            if headers.path == PEER_INVOKE
            else self.calls.catalog(self.identity, stream, headers, body))


class _Ignored:
    """Events of a stream already answered."""

    def on_headers(self, headers: Headers, end_stream: bool) -> None:
        """Nothing to do."""

    def on_data(self, data: bytes, end_stream: bool) -> None:
        """Nothing to do."""

    def on_reset(self, code: int, refused: bool) -> None:
        """Nothing to do."""


class PeerCalls(Front):
    """Inbound: peers' calls on their connections, admitted by the gateway, passed to the
    runtime on one shared HTTP/2 connection per runtime address."""

    def __init__(self, gateway: Gateway) -> None:
        super().__init__(gateway)
        self.upstreams: dict[str, Upstream] = {}

    def serve(self, accepted: terminator.Connection[Inbound]) -> Connection:
        """The HTTP/2 endpoint of one accepted connection."""
        front = PeerConnection(self, accepted.identity)
        conn = Connection(server=True, on_request=front.on_request)
        conn.closed.add_done_callback(
            lambda _: self.gateway.terminator.forget(accepted.key))
        return conn

    def upstream(self, address: str) -> Upstream:
        """The shared connection to a runtime address."""
        found = self.upstreams.get(address)
        if found is None or found.retired:
            found = self.upstreams[address] = Upstream(address)
        return found

    async def invoke(self, identity: Inbound, stream: Stream, headers: CallHeaders,
                     body: bytes) -> None:
        """Admit, forward, settle and answer one Invoke."""
        gateway = self.gateway
        trace_id = headers.trace_id
        try:
            request = read_invoke(body, headers)
            metadata = [(name.decode(errors="replace"), value.decode(errors="replace"))
                        for name, value in headers.forward]
            inbound = await gateway.admit_inbound(identity, request.capability,
                                                  request.input_json, metadata, trace_id)
            # Only our own metadata goes on: the caller is the peer its certificate names.
            output, failed = await invoke(
                self.upstream(inbound.runtime), RUNTIME_INVOKE, body,
                [(_TRACE, trace_id.encode()), (_CALLER, f"federation:{identity.peer}".encode())],
                headers.deadline)
            await gateway.settle_inbound(inbound, output, None if failed is None else
                                         domain_error(failed, request.capability,
                                                      "the runtime"))
        except PacketFlowError as exc:
            stream.send_headers(error_trailers(exc, trace_id), end_stream=True)
            return
        answer(stream, output, trace_id)

    async def catalog(self, identity: Inbound, stream: Stream, headers: CallHeaders,
                      body: bytes) -> None:
        """Answer GetCatalog."""
        try:
            try:
                request = federation_pb2.CatalogRequest.FromString(
                    single_message(body, headers.encoding))
            except (WireError, DecodeError) as exc:
                raise InvalidInput([FieldViolation("request", str(exc) or "not protobuf")]
                                   ) from None
            catalog = await self.gateway.serve_catalog(identity, request.known_version)
        except PacketFlowError as exc:
            stream.send_headers(error_trailers(exc, ""), end_stream=True)
            return
        stream.send_headers(RESPONSE_HEADERS)
        stream.send_data(frame_message(catalog.SerializeToString()))
        stream.send_headers(status_trailers(OK, ""), end_stream=True)

    async def aclose(self) -> None:
        """Cancel calls in flight, close the runtime connections."""
        await self.cancel_calls()
        for upstream in self.upstreams.values():
            await upstream.aclose()


class LocalCalls(Front):
    """Outbound: local callers' Invoke of an import, read off the local port by the HTTP/2
    machinery and sent to the peer on one reused mTLS connection; every other method
    (describe, list, streaming, health) is relayed to the gateway's own gRPC server."""

    def __init__(self, gateway: Gateway, internal: Upstream) -> None:
        super().__init__(gateway)
        self.internal = internal
        self.connections: set[Connection] = set()

    def serve(self) -> Connection:
        """The HTTP/2 endpoint of one local connection."""
        conn = Connection(server=True, on_request=self.on_request)
        self.connections.add(conn)
        conn.closed.add_done_callback(lambda _: self.connections.discard(conn))
        return conn

    def on_request(self, stream: Stream, headers: Headers, end_stream: bool) -> Any:
        """Buffer an Invoke; relay anything else inward."""
        call = read_headers(headers, asyncio.get_running_loop().time())
        if call.path != RUNTIME_INVOKE:
            relay = Relay(self, stream, call, None)
            relay.begin(self.internal)
            return relay
        return self.buffer(self, stream, call, end_stream)

    def unary(self, stream: Stream, headers: CallHeaders, body: bytes) -> _Running:
        """Run a complete Invoke in a task of its own."""
        return self.spawn(self.invoke(stream, headers, body))

    def relayed(self, route_name: str, endpoint: Any, code: int, gateway_failure: bool,
                latency: float) -> None:
        """Relays here go to the gateway's own server only: nothing to count."""

    async def invoke(self, stream: Stream, headers: CallHeaders, body: bytes) -> None:
        """One local Invoke of an import."""
        gateway = self.gateway
        trace_id = headers.trace_id
        try:
            request = read_invoke(body, headers)
            remaining = None if headers.deadline is None \
                else headers.deadline - asyncio.get_running_loop().time()
            output = await gateway.invoke_import(request.capability, request.input_json,
                                                 trace_id, remaining)
        except PacketFlowError as exc:
            stream.send_headers(error_trailers(exc, trace_id), end_stream=True)
            return
        answer(stream, output, trace_id, [
            (name.encode(), value.encode())
            for name, value in gateway.catalog_metadata(request.capability)])

    async def aclose(self) -> None:
        """Cancel calls in flight; close local connections and the inward one."""
        await self.cancel_calls()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        await self.internal.aclose()
