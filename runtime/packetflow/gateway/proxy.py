"""The gateway's data plane: every HTTP/2 stream a caller opens, routed and answered.

Unary calls (Invoke, DescribeCapability and the actor calls but Converse) are buffered whole,
so an attempt can be retried or hedged; each runs as a small state machine driven by its
attempts' events and two timers (the caller's deadline, the hedge delay), without a task of
its own. Streaming calls (InvokeStream, Converse) are relayed both ways once their first
message says where they go. ListCapabilities is answered from the routing table; anything
else (health, reflection, unknown methods) is relayed to the gateway's own gRPC server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
from google.protobuf.message import DecodeError

from packetflow.context import (
    CALLER_KEY,
    IDEMPOTENCY_KEY,
    TRACE_ID_KEY,
    TRACEPARENT_KEY,
    traceparent_trace_id,
)
from packetflow.gateway.budget import ShareBudget
from packetflow.gateway.grpcwire import (
    RESPONSE_HEADERS,
    WireError,
    first_message,
    format_timeout,
    frame_message,
    parse_timeout,
    single_message,
    status_of,
    status_trailers,
    trailers_only,
)
from packetflow.gateway.h2 import (
    CANCEL,
    CONNECTION_LOST,
    REFUSED_STREAM,
    Headers,
    Stream,
    StreamHandler,
    StreamRefused,
)
from packetflow.gateway.hedging import hedge_delay
from packetflow.gateway.policy import (
    CANCELLED,
    DEADLINE_EXCEEDED,
    INTERNAL,
    OK,
    RESOURCE_EXHAUSTED,
    SESSION_KEY,
    UNAVAILABLE,
    choose_canary,
    may_retry,
)
from packetflow.gateway.routing import (
    ActorRoute,
    CapabilityRoute,
    Endpoint,
    Pool,
    RoutePolicy,
    RoutingTable,
)
from packetflow.gateway.upstream import ConnectFailed, Upstream
from packetflow.v1 import actors_pb2, runtime_pb2

log = logging.getLogger("packetflow.gateway")

_RUNTIME = "/packetflow.v1.CapabilityRuntime/"
_ACTORS = "/packetflow.v1.ActorRuntime/"
INVOKE = f"{_RUNTIME}Invoke".encode()
INVOKE_STREAM = f"{_RUNTIME}InvokeStream".encode()
LIST_CAPABILITIES = f"{_RUNTIME}ListCapabilities".encode()
DESCRIBE = f"{_RUNTIME}DescribeCapability".encode()
SEND = f"{_ACTORS}Send".encode()
CONVERSE = f"{_ACTORS}Converse".encode()
LIST_ACTORS = f"{_ACTORS}ListActors".encode()
GET_ACTOR = f"{_ACTORS}GetActor".encode()
DELETE_ACTOR = f"{_ACTORS}DeleteActor".encode()
FEEDBACK = f"{_RUNTIME}Feedback".encode()
LIST_ACTOR_TYPES = f"{_ACTORS}ListActorTypes".encode()
DESCRIBE_ACTOR_TYPE = f"{_ACTORS}DescribeActorType".encode()
FOLLOWUPS = f"{_ACTORS}Followups".encode()
UNARY_METHODS = frozenset({INVOKE, DESCRIBE, SEND, LIST_ACTORS, GET_ACTOR, DELETE_ACTOR,
                           LIST_CAPABILITIES, FEEDBACK, LIST_ACTOR_TYPES, DESCRIBE_ACTOR_TYPE})

CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
_TRACE = TRACE_ID_KEY.encode()
_CALLER = CALLER_KEY.encode()
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED.value[0]
_TRACEPARENT = TRACEPARENT_KEY.encode()
_SESSION = SESSION_KEY.encode()
_IDEMPOTENCY = IDEMPOTENCY_KEY.encode()
# Not worth a retry with less time than this left before the caller's deadline.
MIN_RETRY_SECONDS = 0.002
# How long ListCapabilities waits for backends to describe capabilities it knows no intent of.
DESCRIBE_TIMEOUT = 2.0


# ------------------------------------------------------------------ request headers


@dataclass(slots=True)
class CallHeaders:
    """What the gateway reads of a request's headers, and the headers it passes on."""

    path: bytes
    forward: Headers  # without pseudo-headers and grpc-timeout; with a trace id
    deadline: float | None  # event-loop time
    trace_id: str
    session: bytes | None
    idempotency_key: bool
    encoding: bytes | None

    def upstream_headers(self, authority: bytes, now: float) -> Headers:
        """The header block of one attempt: the caller's, the remaining deadline, the
        backend's authority."""
        headers = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", self.path),
                   (b":authority", authority), *self.forward]
        if self.deadline is not None:
            headers.append((b"grpc-timeout", format_timeout(self.deadline - now)))
        return headers


def read_headers(headers: Headers, now: float, caller: bytes | None = None) -> CallHeaders:
    """Parse a request's header block (one pass); ``caller``: the caller a client certificate
    proved, forwarded in place of any ``packetflow-caller`` the request claims."""
    path = b""
    forward: Headers = []
    deadline = trace = traceparent = session = encoding = None
    idempotent = False
    for name, value in headers:
        if name[:1] == b":":
            if name == b":path":
                path = value
            continue
        if name == b"grpc-timeout":
            timeout = parse_timeout(value)
            deadline = None if timeout is None else now + timeout
            continue
        if name == _TRACE:
            trace = value
        elif name == _TRACEPARENT:
            traceparent = value
        elif name == _SESSION:
            session = value
        elif name == _IDEMPOTENCY:
            idempotent = True
        elif name == b"grpc-encoding":
            encoding = value
        elif name == _CALLER and caller is not None:
            continue  # a claim: the proven caller is forwarded instead
        forward.append((name, value))
    if caller is not None:
        forward.append((_CALLER, caller))
    if trace is not None:
        trace_id = trace.decode(errors="replace")
    else:
        parsed = traceparent_trace_id(traceparent.decode(errors="replace")) \
            if traceparent is not None else None
        trace_id = parsed or os.urandom(16).hex()
        if parsed is None:  # the backend and the gateway's own errors carry the same id
            forward.append((_TRACE, trace_id.encode()))
    return CallHeaders(path, forward, deadline, trace_id, session, idempotent, encoding)


# ------------------------------------------------------------------ where a call may go


class PoolTarget:
    """Endpoints of a capability version (falling back to the other version when the chosen
    one has none left), or any member of an actor type."""

    __slots__ = ("budget", "hedge_budget", "hedging", "latency", "now", "policy", "pools",
                 "rng", "route_name", "safe")

    def __init__(self, table: RoutingTable, route_name: str, pools: Sequence[Pool],
                 policy: RoutePolicy, budget: ShareBudget, safe: bool,
                 route: CapabilityRoute | None = None, hedge: bool = False) -> None:
        self.route_name = route_name
        self.pools = pools
        self.policy = policy
        self.budget = budget
        self.safe = safe
        self.now = table.clock
        self.rng = table.rng
        self.hedging = hedge and route is not None
        self.hedge_budget = route.hedge_budget if route is not None else None
        self.latency = route.latency if route is not None else None

    def pick(self, tried: Sequence[Endpoint], hedge: bool = False) -> Endpoint | None:
        """The endpoint for the next attempt: one not ``tried`` while any is left, in the
        first version that has one. A retry may cross to the other version (an answer
        beats none); a hedge stays in the call's version (its split stays what was asked).
        """
        pools = self.pools[:1] if hedge else self.pools
        now = self.now()
        if tried:
            for pool in pools:
                if any(e not in tried for e in pool.available):
                    return pool.pick(self.rng, now, tried)
        for pool in pools:
            if pool.available:
                return pool.pick(self.rng, now, tried)
        return None

    def has_other(self, tried: Sequence[Endpoint], hedge: bool = False) -> bool:
        """Whether an endpoint not yet tried is available (in the call's version, for a
        hedge)."""
        pools = self.pools[:1] if hedge else self.pools
        return any(e not in tried for pool in pools for e in pool.available)

    def why_none(self) -> str:
        """Why no endpoint can be picked."""
        return self.pools[0].why_empty()

    def hedge_after(self) -> float | None:
        """Seconds before a hedge, or None when this call is not hedged."""
        if not self.hedging or self.latency is None:
            return None
        return hedge_delay(self.latency, self.policy.hedge_min_delay)

    def succeeded(self, seconds: float) -> None:
        """A successful attempt's latency feeds the hedge delay."""
        if self.latency is not None:
            self.latency.record(seconds)


class OwnerTarget:
    """The member owning an actor id; a retry goes to the next member in line."""

    __slots__ = ("actor_id", "budget", "policy", "route", "route_name", "safe")

    hedge_budget = None

    def __init__(self, route: ActorRoute, actor_id: str, safe: bool) -> None:
        self.route = route
        self.route_name = route.name
        self.actor_id = actor_id
        self.policy = route.policy
        self.budget = route.retry_budget
        self.safe = safe

    def pick(self, tried: Sequence[Endpoint], hedge: bool = False) -> Endpoint | None:
        """The owner among members not tried yet (the owner itself when all were)."""
        return self.route.owner(self.actor_id, tried) or self.route.owner(self.actor_id)

    def has_other(self, tried: Sequence[Endpoint], hedge: bool = False) -> bool:
        """Whether a member not yet tried is in service."""
        return self.route.owner(self.actor_id, tried) is not None

    def why_none(self) -> str:
        """Why no member can be picked."""
        return self.route.members.why_empty()

    def hedge_after(self) -> None:
        """Actor calls are never hedged: one actor handles one message at a time."""
        return None

    def succeeded(self, seconds: float) -> None:
        """Nothing to learn."""


Target = PoolTarget | OwnerTarget


# ------------------------------------------------------------------ attempts


class Attempt:
    """One try of a unary call on one endpoint; buffers the whole answer."""

    __slots__ = (
        "chunks",
        "code",
        "connecting",
        "delivered",
        "endpoint",
        "finished",
        "gateway_failure",
        "headers",
        "limit",
        "message",
        "owner",
        "route_name",
        "size",
        "started",
        "stream",
        "table",
        "trailers",
    )

    def __init__(self, owner: AttemptOwner, table: RoutingTable, route_name: str,
                 endpoint: Endpoint, limit: int) -> None:
        self.owner = owner
        self.table = table
        self.route_name = route_name
        self.endpoint = endpoint
        self.limit = limit
        self.stream: Stream | None = None
        self.connecting: asyncio.Future[None] | None = None
        self.headers: Headers | None = None
        self.trailers: Headers = []
        self.chunks: list[bytes] = []
        self.size = 0
        self.code = OK
        self.message = ""
        self.delivered = True
        self.gateway_failure = False
        self.finished = False
        self.started = 0.0

    def send(self, headers: Headers, body: bytes) -> None:
        """Start: on the live connection now, or after connecting."""
        self.endpoint.load.started()
        self.started = asyncio.get_running_loop().time()
        upstream = self.endpoint.upstream
        try:
            stream = upstream.stream(self)
        except StreamRefused as exc:
            self._soon_fail(str(exc))
            return
        if stream is None:
            self.connecting = asyncio.ensure_future(self._connect(upstream, headers, body))
            return
        self._write(stream, headers, body)

    def _write(self, stream: Stream, headers: Headers, body: bytes) -> None:
        self.stream = stream
        stream.send_headers(headers)
        stream.send_data(body, end_stream=True)

    async def _connect(self, upstream: Upstream, headers: Headers, body: bytes) -> None:
        try:
            conn = await upstream.connect()
            stream = conn.open_stream(self)
        except (ConnectFailed, StreamRefused) as exc:
            self.fail(UNAVAILABLE, str(exc), delivered=False, gateway_failure=True)
            return
        if self.finished:  # abandoned while connecting
            stream.reset(CANCEL)
        else:
            self._write(stream, headers, body)

    def _soon_fail(self, message: str) -> None:
        # Not from inside send(): the owner may be launching this attempt right now.
        asyncio.get_running_loop().call_soon(
            lambda: self.fail(UNAVAILABLE, message, delivered=False, gateway_failure=True))

    # --- events of the upstream stream

    def on_headers(self, headers: Headers, end_stream: bool) -> None:
        """Response headers, then trailers (or trailers only)."""
        if not end_stream:
            self.headers = headers
            return
        self.trailers = headers
        code, message = status_of(headers)
        self._finish(code, message, gateway_failure=code == UNAVAILABLE)

    def on_data(self, data: bytes, end_stream: bool) -> None:
        """Buffer the answer (credit goes back at once: the size is bounded here)."""
        self.chunks.append(data)
        self.size += len(data)
        if self.stream is not None:
            self.stream.consumed(len(data))
        if self.size > self.limit:
            if self.stream is not None:
                self.stream.reset(CANCEL)
            self.fail(RESOURCE_EXHAUSTED, f"the answer is over the gateway's limit of "
                                          f"{self.limit} bytes")
        elif end_stream:
            self.fail(INTERNAL, "the backend ended the call without a status")

    def on_reset(self, code: int, refused: bool) -> None:
        """The backend reset the stream, or the connection went away."""
        if refused:
            self.fail(UNAVAILABLE, f"{self.endpoint.address} refused the call",
                      delivered=False, gateway_failure=True)
        elif code == CONNECTION_LOST:
            self.fail(UNAVAILABLE, f"lost the connection to {self.endpoint.address}",
                      gateway_failure=True)
        elif code == CANCEL:
            self.fail(CANCELLED, f"{self.endpoint.address} cancelled the call")
        else:
            self.fail(INTERNAL, f"{self.endpoint.address} reset the call (HTTP/2 error "
                                f"{code})", gateway_failure=code == REFUSED_STREAM)

    # --- endings

    def fail(self, code: int, message: str, *, delivered: bool = True,
             gateway_failure: bool = False) -> None:
        """End with a status the gateway gives (the backend sent none)."""
        self.trailers = []
        self.headers = None
        self.delivered = delivered
        self._finish(code, message, gateway_failure)

    def _finish(self, code: int, message: str, gateway_failure: bool) -> None:
        if self.finished:
            return
        self.finished = True
        if self.stream is not None and self.stream.open:
            self.stream.reset(CANCEL)  # answered before the request was all sent
        self.code, self.message, self.gateway_failure = code, message, gateway_failure
        now = asyncio.get_running_loop().time()
        latency = now - self.started
        endpoint = self.endpoint
        endpoint.load.finished(latency, self.table.clock())
        endpoint.count(CODE_NAMES.get(code, str(code)), latency)
        self.table.record(self.route_name, endpoint, code, gateway_failure)
        self.owner.attempt_done(self)

    def cancel(self) -> None:
        """Abandon (a hedge's loser, a call that ended): reset the stream; the time it took
        so far is a lower bound of the endpoint's latency."""
        if self.finished:
            return
        self.finished = True
        if self.stream is not None:
            self.stream.reset(CANCEL)
        if self.connecting is not None:
            self.connecting.cancel()
        self.endpoint.load.finished(self.latency, self.table.clock(), abandoned=True)
        self.endpoint.count("CANCELLED", -1.0)

    @property
    def body(self) -> bytes:
        """The buffered answer body."""
        return b"".join(self.chunks)

    @property
    def latency(self) -> float:
        """Seconds from start to answer."""
        return asyncio.get_running_loop().time() - self.started


class AttemptOwner:
    """Whoever waits for attempts."""

    def attempt_done(self, attempt: Attempt) -> None:
        """An attempt finished (not called for cancelled ones)."""
        raise NotImplementedError


# ------------------------------------------------------------------ unary calls


class UnaryCall(AttemptOwner):
    """One buffered call: first attempt, maybe a hedge, retries within budget and deadline."""

    __slots__ = ("body", "deadline_timer", "done", "gateway", "headers", "hedge_timer",
                 "hedged", "running", "started", "stream", "target", "tried")

    def __init__(self, gateway: Gateway, stream: Stream, headers: CallHeaders, body: bytes,
                 target: Target) -> None:
        self.gateway = gateway
        self.stream = stream
        self.headers = headers
        self.body = body
        self.target = target
        self.running: list[Attempt] = []
        self.tried: list[Endpoint] = []
        self.done = False
        self.hedged = False
        self.deadline_timer: asyncio.TimerHandle | None = None
        self.hedge_timer: asyncio.TimerHandle | None = None
        self.started = 0.0

    def begin(self) -> None:
        """Send the first attempt and arm the deadline and hedge timers."""
        loop = asyncio.get_running_loop()
        self.started = loop.time()
        deadline = self.headers.deadline
        if deadline is not None:
            self.deadline_timer = loop.call_at(deadline, self._deadline_passed)
        target = self.target
        target.budget.deposit()
        if target.hedge_budget is not None:
            target.hedge_budget.deposit()
        endpoint = target.pick(self.tried)
        if endpoint is None:
            self.fail(UNAVAILABLE, f"{self.target.route_name}: {target.why_none()}")
            return
        self._launch(endpoint)
        delay = target.hedge_after()
        if delay is not None:
            self.hedge_timer = loop.call_later(delay, self._hedge)

    def _launch(self, endpoint: Endpoint) -> None:
        attempt = Attempt(self, self.gateway.table, self.target.route_name, endpoint,
                          self.gateway.max_message)
        self.running.append(attempt)
        self.tried.append(endpoint)
        now = asyncio.get_running_loop().time()
        attempt.send(self.headers.upstream_headers(endpoint.upstream.authority, now),
                     self.body)

    def _hedge(self) -> None:
        self.hedge_timer = None
        target = self.target
        if self.done or len(self.running) != 1 or not target.has_other(self.tried, hedge=True):
            return
        assert target.hedge_budget is not None
        if not target.hedge_budget.try_withdraw():
            self.gateway.exhausted(target.route_name, "hedge")
            return
        endpoint = target.pick(self.tried, hedge=True)
        if endpoint is None or endpoint in self.tried:
            return
        self.hedged = True
        self.gateway.table.metrics.hedges.labels(target.route_name).inc()
        self._launch(endpoint)

    def attempt_done(self, attempt: Attempt) -> None:
        """Decide on an answer: reply, wait for another attempt, or retry."""
        if self.done:
            return
        self.running.remove(attempt)
        code = attempt.code
        if code == OK:
            self.target.succeeded(attempt.latency)
            self.reply(attempt)
            return
        if attempt.delivered and code not in (UNAVAILABLE, RESOURCE_EXHAUSTED):
            self.reply(attempt)  # a final answer (the caller's error, or the handler's)
            return
        if self.running:
            return  # a hedge is still out: its answer may yet succeed
        if not self._retry(attempt):
            self.reply(attempt)

    def _retry(self, failed: Attempt) -> bool:
        target = self.target
        if not may_retry(failed.code, delivered=failed.delivered, safe=target.safe,
                         other_endpoint=target.has_other(self.tried)):
            return False
        if len(self.tried) >= target.policy.max_attempts:
            return False
        deadline = self.headers.deadline
        if deadline is not None and \
                deadline - asyncio.get_running_loop().time() < MIN_RETRY_SECONDS:
            return False
        if not target.budget.try_withdraw():
            self.gateway.exhausted(target.route_name, "retry")
            return False
        endpoint = target.pick(self.tried)
        if endpoint is None:
            return False
        self.gateway.table.metrics.retries.labels(target.route_name).inc()
        log.info("retrying %s on %s after %s from %s", target.route_name, endpoint.address,
                 CODE_NAMES.get(failed.code), failed.endpoint.address,
                 extra={"trace_id": self.headers.trace_id, "capability": target.route_name})
        self._launch(endpoint)
        return True

    def _deadline_passed(self) -> None:
        self.deadline_timer = None
        self.fail(DEADLINE_EXCEEDED, "deadline exceeded (at the gateway)")

    def _end(self, code: int) -> None:
        self.done = True
        for timer in (self.deadline_timer, self.hedge_timer):
            if timer is not None:
                timer.cancel()
        for attempt in self.running:
            attempt.cancel()
        self.running.clear()
        self.gateway.count_call(self.target.route_name, code,
                                asyncio.get_running_loop().time() - self.started)

    def reply(self, attempt: Attempt) -> None:
        """Answer the caller with an attempt's response (or the status it ended with)."""
        if attempt.trailers and attempt.headers is None and \
                any(name == b":status" for name, _ in attempt.trailers):
            self._end(attempt.code)
            self.stream.send_headers(attempt.trailers, end_stream=True)  # trailers-only
            return
        if not attempt.trailers:
            self.fail(attempt.code, attempt.message)
            return
        self._end(attempt.code)
        stream = self.stream
        stream.send_headers(attempt.headers or [(b":status", b"200")])
        stream.send_data(attempt.body)
        stream.send_headers(attempt.trailers, end_stream=True)

    def fail(self, code: int, message: str) -> None:
        """Answer with a status of the gateway's own."""
        if self.done:
            return
        self._end(code)
        self.stream.send_headers(
            trailers_only(code, message, [(_TRACE, self.headers.trace_id.encode())]),
            end_stream=True)

    def cancelled(self) -> None:
        """The caller went away: abandon every attempt."""
        if not self.done:
            self._end(CANCELLED)


# ------------------------------------------------------------------ front streams


class Answering(Protocol):
    """A unary call under way, as its request stream sees it."""

    def cancelled(self) -> None:
        """The caller went away."""


class UnaryFront(Protocol):
    """What takes complete unary requests: this gateway, or the federation's data path."""

    max_message: int

    def refuse(self, stream: Stream, headers: CallHeaders, code: int, message: str) -> None:
        """Answer a call with a status of one's own."""

    def unary(self, stream: Stream, headers: CallHeaders, body: bytes) -> Answering | None:
        """Start a complete request's call."""


class RelayFront(Protocol):
    """What a :class:`Relay` reports to: this gateway, or the federation's data path (whose
    relays go to its own gRPC server only, never to an endpoint)."""

    max_message: int

    def relayed(self, route_name: str, endpoint: Endpoint, code: int, gateway_failure: bool,
                latency: float) -> None:
        """A relayed stream to ``endpoint`` ended with ``code``."""


class Buffered:
    """Collects a unary request's body, then hands it to the gateway."""

    __slots__ = ("call", "chunks", "gateway", "headers", "size", "stream")

    def __init__(self, gateway: UnaryFront, stream: Stream, headers: CallHeaders) -> None:
        self.gateway = gateway
        self.stream = stream
        self.headers = headers
        self.chunks: list[bytes] = []
        self.size = 0
        self.call: Answering | None = None

    def on_headers(self, headers: Headers, end_stream: bool) -> None:
        """Request trailers carry nothing the gateway needs."""
        if end_stream:
            self._complete()

    def on_data(self, data: bytes, end_stream: bool) -> None:
        """Append; answer RESOURCE_EXHAUSTED past the size limit."""
        self.chunks.append(data)
        self.size += len(data)
        self.stream.consumed(len(data))
        if self.size > self.gateway.max_message:
            self.gateway.refuse(self.stream, self.headers, RESOURCE_EXHAUSTED,
                                f"the request is over the gateway's limit of "
                                f"{self.gateway.max_message} bytes")
            self.chunks.clear()
        elif end_stream:
            self._complete()

    def _complete(self) -> None:
        if self.stream.local_closed or not self.stream.open:
            return
        self.call = self.gateway.unary(self.stream, self.headers, b"".join(self.chunks))

    def on_reset(self, code: int, refused: bool) -> None:
        """The caller cancelled."""
        if self.call is not None:
            self.call.cancelled()


class Relay:
    """A streaming call forwarded both ways between the caller and one upstream stream,
    opened once the first request message says where it goes (at once for ``route=None``).
    """

    def __init__(self, gateway: RelayFront, down: Stream, headers: CallHeaders,
                 route: Callable[[bytes], tuple[str, Endpoint]] | None,
                 ended: bool | None = None) -> None:
        self.gateway = gateway
        self.down = down
        self.headers = headers
        self.route = route
        self.pending = bytearray()
        # Whether the request ended with its headers (a call held for review may have
        # received its end since: those events come later, through on_data).
        self.pending_end = down.remote_closed if ended is None else ended
        self.up: Stream | None = None
        self.connecting: asyncio.Future[None] | None = None
        self.route_name = ""
        self.endpoint: Endpoint | None = None
        self.answered = False  # response headers went to the caller
        self.finished = False
        self.started = asyncio.get_running_loop().time()

    def begin(self, upstream: Upstream | None = None) -> None:
        """Open the upstream stream now (``upstream`` given) or when routable."""
        if upstream is not None:
            self._open(upstream)
        elif self.pending_end:
            self._route()

    # --- the caller's side

    def on_headers(self, headers: Headers, end_stream: bool) -> None:
        """Request trailers: only the end matters."""
        if end_stream:
            self.on_data(b"", True)

    def on_data(self, data: bytes, end_stream: bool) -> None:
        """Forward (credit returns to the caller as bytes leave), or buffer until routed."""
        if self.finished:
            self.down.consumed(len(data))
            return
        if self.up is not None:
            self.up.send_data(data, end_stream, on_sent=self.down.consumed)
            return
        self.pending += data
        self.down.consumed(len(data))
        self.pending_end = self.pending_end or end_stream
        if len(self.pending) > self.gateway.max_message:
            self._fail(RESOURCE_EXHAUSTED, "the first message is over the gateway's limit")
        elif self.connecting is None and self.route is not None:
            self._route()

    def on_reset(self, code: int, refused: bool) -> None:
        """The caller cancelled: so does the upstream."""
        if self.up is not None:
            self.up.reset(CANCEL)
        if self.connecting is not None:
            self.connecting.cancel()
        self._done(CANCELLED, gateway_failure=False)

    def _route(self) -> None:
        assert self.route is not None
        try:
            message = first_message(self.pending)
            if message is None:
                if self.pending_end:
                    raise WireError(13, "the stream ended before its first message")
                return
            self.route_name, self.endpoint = self.route(message)
        except WireError as exc:
            self._fail(exc.code, exc.message)
            return
        self.endpoint.load.started()
        self._open(self.endpoint.upstream)

    def _open(self, upstream: Upstream) -> None:
        try:
            stream = upstream.stream(_RelayUp(self))
        except StreamRefused as exc:
            self._fail(UNAVAILABLE, str(exc), gateway_failure=True)
            return
        if stream is None:
            self.connecting = asyncio.ensure_future(self._connect(upstream))
        else:
            self._start(stream)

    async def _connect(self, upstream: Upstream) -> None:
        try:
            stream = (await upstream.connect()).open_stream(_RelayUp(self))
        except (ConnectFailed, StreamRefused) as exc:
            self._fail(UNAVAILABLE, str(exc), gateway_failure=True)
            return
        if self.finished:
            stream.reset(CANCEL)
        else:
            self._start(stream)

    def _start(self, stream: Stream) -> None:
        self.up = stream
        now = asyncio.get_running_loop().time()
        authority = self.endpoint.upstream.authority if self.endpoint is not None \
            else b"localhost"
        stream.send_headers(self.headers.upstream_headers(authority, now))
        if self.pending or self.pending_end:
            stream.send_data(bytes(self.pending), self.pending_end)
        self.pending.clear()

    # --- the upstream's side

    def upstream_headers(self, headers: Headers, end_stream: bool) -> None:
        """Response headers or trailers, to the caller."""
        self.answered = True
        self.down.send_headers(headers, end_stream)
        if end_stream:
            self._done(status_of(headers)[0], gateway_failure=False)

    def upstream_data(self, data: bytes, end_stream: bool) -> None:
        """Response bytes, to the caller; credit returns upstream as they leave."""
        up = self.up
        self.down.send_data(data, False, on_sent=up.consumed if up is not None else None)
        if end_stream:
            self._fail(INTERNAL, "the backend ended the stream without a status")

    def upstream_reset(self, code: int, refused: bool) -> None:
        """The upstream failed: the caller gets a status."""
        lost = refused or code in (CONNECTION_LOST, REFUSED_STREAM)
        self._fail(UNAVAILABLE if lost else CANCELLED if code == CANCEL else INTERNAL,
                   f"the backend {'is unreachable' if lost else 'reset the stream'}",
                   gateway_failure=lost)

    def _fail(self, code: int, message: str, gateway_failure: bool = False) -> None:
        if self.finished:
            return
        extra = [(_TRACE, self.headers.trace_id.encode())]
        self.down.send_headers(status_trailers(code, message, extra) if self.answered
                               else trailers_only(code, message, extra), end_stream=True)
        if self.up is not None:
            self.up.reset(CANCEL)
        self._done(code, gateway_failure)

    def _done(self, code: int, gateway_failure: bool) -> None:
        if self.finished:
            return
        self.finished = True
        if self.up is not None and self.up.open:
            self.up.reset(CANCEL)  # the answer ended while the caller was still sending
        if self.endpoint is not None:
            self.gateway.relayed(self.route_name, self.endpoint, code, gateway_failure,
                                 asyncio.get_running_loop().time() - self.started)


class _RelayUp:
    """The upstream stream's events, handed to its relay."""

    __slots__ = ("relay",)

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def on_headers(self, headers: Headers, end_stream: bool) -> None:
        self.relay.upstream_headers(headers, end_stream)

    def on_data(self, data: bytes, end_stream: bool) -> None:
        self.relay.upstream_data(data, end_stream)

    def on_reset(self, code: int, refused: bool) -> None:
        self.relay.upstream_reset(code, refused)


class _Ignore:
    """Events of a stream already answered."""

    def on_headers(self, headers: Headers, end_stream: bool) -> None:
        """Nothing to do."""

    def on_data(self, data: bytes, end_stream: bool) -> None:
        """Nothing to do."""

    def on_reset(self, code: int, refused: bool) -> None:
        """Nothing to do."""


# ------------------------------------------------------------------ the gateway


class Gateway:
    """Routes every stream of the gateway's listener (``on_request``)."""

    def __init__(self, table: RoutingTable, internal: Upstream, max_message: int) -> None:
        self.table = table
        self.internal = internal
        self.max_message = max_message
        self._call_counts: dict[tuple[str, int], object] = {}
        self._tasks: set[asyncio.Future[None]] = set()

    def on_request(self, stream: Stream, headers: Headers, end_stream: bool) -> StreamHandler:
        """A new call: buffer it (unary), relay it (streaming), or pass it to the gateway's
        own gRPC server (health, reflection, anything else)."""
        conn = stream.conn
        call = read_headers(headers, asyncio.get_running_loop().time(), conn.caller)
        if conn.refusal is not None or time.time() > conn.caller_until:
            self.refuse(stream, call, UNAUTHENTICATED, conn.refusal or
                        f"the client certificate of {(conn.caller or b'').decode()} expired")
            return _Ignore()
        return self.serve(stream, call, end_stream)

    def serve(self, stream: Stream, call: CallHeaders, end_stream: bool) -> StreamHandler:
        """Route a call whose caller is settled (``end_stream``: its header block ended
        the request)."""
        if call.path in UNARY_METHODS:
            handler = Buffered(self, stream, call)
            if end_stream:
                handler.on_data(b"", True)
            return handler
        if call.path == INVOKE_STREAM:
            relay = Relay(self, stream, call, self._route_invoke_stream, end_stream)
        elif call.path == CONVERSE:
            relay = Relay(self, stream, call, self._route_converse, end_stream)
        elif call.path == FOLLOWUPS:
            relay = Relay(self, stream, call, self._route_followups, end_stream)
        else:
            relay = Relay(self, stream, call, None, end_stream)
            relay.begin(self.internal)
            return relay
        relay.begin()
        return relay

    def refuse(self, stream: Stream, headers: CallHeaders, code: int, message: str) -> None:
        """Answer a call with the gateway's own status."""
        stream.send_headers(trailers_only(code, message, [(_TRACE, headers.trace_id.encode())]),
                            end_stream=True)

    def unary(self, stream: Stream, headers: CallHeaders, body: bytes) -> UnaryCall | None:
        """Route a complete unary request and start its call."""
        if headers.path in (LIST_CAPABILITIES, LIST_ACTOR_TYPES):
            task = asyncio.ensure_future(self._list(stream, headers))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return None
        try:
            target = self._target(headers, single_message(body, headers.encoding))
        except WireError as exc:
            self.refuse(stream, headers, exc.code, exc.message)
            return None
        call = UnaryCall(self, stream, headers, body, target)
        call.begin()
        return call

    def _target(self, headers: CallHeaders, message: bytes) -> Target:
        path = headers.path
        try:
            if path == INVOKE:
                name = runtime_pb2.InvokeRequest.FromString(message).capability
                route = self._capability(name)
                return PoolTarget(self.table, name, self._pools(route, headers.session),
                                  route.policy, route.retry_budget,
                                  safe=route.pure or headers.idempotency_key, route=route,
                                  hedge=route.pure and route.policy.hedging)
            if path == DESCRIBE:
                route = self._capability(
                    runtime_pb2.DescribeCapabilityRequest.FromString(message).name)
                return PoolTarget(self.table, route.name, (route.stable, route.canary),
                                  route.policy, route.retry_budget, safe=True)
            if path == FEEDBACK:
                feedback = runtime_pb2.FeedbackRequest.FromString(message)
                if not feedback.capability:
                    # Only the runtime that served the call knows its trace id.
                    raise WireError(3, "capability: name it: through the gateway the trace id "
                                       "alone cannot say which runtime served the call")
                route = self._capability(feedback.capability)
                return PoolTarget(self.table, route.name, (route.stable, route.canary),
                                  route.policy, route.retry_budget, safe=False)
            if path == DESCRIBE_ACTOR_TYPE:
                actor = self._actor(
                    actors_pb2.DescribeActorTypeRequest.FromString(message).name)
                return PoolTarget(self.table, actor.name, (actor.members,), actor.policy,
                                  actor.retry_budget, safe=True)
            if path == SEND:
                send = actors_pb2.SendRequest.FromString(message)
                return OwnerTarget(self._actor(send.type), send.id, safe=bool(send.message_id))
            if path == LIST_ACTORS:
                actor = self._actor(actors_pb2.ListActorsRequest.FromString(message).type)
                return PoolTarget(self.table, actor.name, (actor.members,), actor.policy,
                                  actor.retry_budget, safe=True)
            request = (actors_pb2.GetActorRequest if path == GET_ACTOR
                       else actors_pb2.DeleteActorRequest).FromString(message)
            return OwnerTarget(self._actor(request.type), request.id, safe=path == GET_ACTOR)
        except DecodeError:
            raise WireError(3, "the request is not a valid protobuf message") from None

    def _capability(self, name: str) -> CapabilityRoute:
        route = self.table.capabilities.get(name)
        if route is None:
            raise self._missing("capability", name)
        return route

    def _actor(self, name: str) -> ActorRoute:
        route = self.table.actors.get(name)
        if route is None:
            raise self._missing("actor type", name)
        return route

    def _missing(self, kind: str, name: str) -> WireError:
        problem = self.table.problems.get(name)
        if problem is not None:
            return WireError(9, f"{kind} {name!r}: {problem}")  # FAILED_PRECONDITION
        return WireError(5, f"{kind} {name!r} is not served by this gateway")  # NOT_FOUND

    def _pools(self, route: CapabilityRoute, session: bytes | None) -> tuple[Pool, ...]:
        """The version a call goes to by the weights, then the other: a version with no
        endpoint in service passes its calls on rather than failing them."""
        if route.weight > 0 and choose_canary(route.weight, session, self.table.rng):
            return (route.canary, route.stable)
        return (route.stable, route.canary)

    def _route_invoke_stream(self, message: bytes) -> tuple[str, Endpoint]:
        try:
            name = runtime_pb2.InvokeRequest.FromString(message).capability
        except DecodeError:
            raise WireError(3, "the request is not a valid protobuf message") from None
        route = self._capability(name)
        for pool in self._pools(route, None):
            endpoint = pool.pick(self.table.rng, self.table.clock())
            if endpoint is not None:
                return name, endpoint
        raise WireError(UNAVAILABLE, f"{name}: {route.stable.why_empty()}")

    def _route_converse(self, message: bytes) -> tuple[str, Endpoint]:
        try:
            first = actors_pb2.ConverseRequest.FromString(message)
        except DecodeError:
            raise WireError(3, "the request is not a valid protobuf message") from None
        if not first.type or not first.id:
            raise WireError(3, "the first message of a conversation names the actor")
        route = self._actor(first.type)
        endpoint = route.owner(first.id)
        if endpoint is None:
            raise WireError(UNAVAILABLE, f"{first.type}: {route.members.why_empty()}")
        return route.name, endpoint

    def _route_followups(self, message: bytes) -> tuple[str, Endpoint]:
        try:
            request = actors_pb2.FollowupsRequest.FromString(message)
        except DecodeError:
            raise WireError(3, "the request is not a valid protobuf message") from None
        route = self._actor(request.type)
        endpoint = route.owner(request.id)
        if endpoint is None:
            raise WireError(UNAVAILABLE, f"{request.type}: {route.members.why_empty()}")
        return route.name, endpoint

    async def _list(self, stream: Stream, headers: CallHeaders) -> None:
        try:
            payload = await (self.list_capabilities() if headers.path == LIST_CAPABILITIES
                             else self.list_actor_types())
        except Exception:  # the answer must come, whatever broke
            log.exception("listing failed")
            self.refuse(stream, headers, INTERNAL, "listing failed; see the gateway log")
            return
        stream.send_headers(RESPONSE_HEADERS)
        stream.send_data(frame_message(payload))
        stream.send_headers(status_trailers(OK, ""), end_stream=True)

    async def describe(self, name: str) -> None:
        """Ask a backend for a capability's effects, intent and implementation kind."""
        route = self.table.capabilities.get(name)
        if route is None:
            return
        endpoint = next((e for pool in route.pools() for e in pool.available), None)
        if endpoint is None:
            return
        request = runtime_pb2.DescribeCapabilityRequest(name=name).SerializeToString()
        code, payload = await fetch(self.table, name, endpoint, DESCRIBE, request,
                                    DESCRIBE_TIMEOUT, self.max_message)
        current = self.table.capabilities.get(name)
        if code != OK or current is None:
            return
        described = runtime_pb2.CapabilityDescription.FromString(payload)
        effects = tuple(described.effects)
        if current.effects != effects:
            log.info("%s declares effects %s", name, list(effects) or "none",
                     extra={"capability": name, "effects": list(effects)})
        current.effects = effects
        current.intent, current.implementation = described.intent, described.implementation

    async def list_capabilities(self) -> bytes:
        """ListCapabilities for every routed capability (asking backends what is unknown)."""
        await describe_all([r.name for r in self.table.capabilities.values() if not r.intent],
                           self.describe)
        routes: list[CapabilityRoute] = sorted(self.table.capabilities.values(),
                                               key=lambda r: r.name)
        return runtime_pb2.ListCapabilitiesResponse(capabilities=[
            runtime_pb2.CapabilitySummary(name=r.name, intent=r.intent,
                                          implementation=r.implementation)
            for r in routes]).SerializeToString()

    async def describe_actor_type(self, name: str) -> None:
        """Ask a member for an actor type's intent."""
        route = self.table.actors.get(name)
        endpoint = next(iter(route.members.available), None) if route is not None else None
        if endpoint is None:
            return
        request = actors_pb2.DescribeActorTypeRequest(name=name).SerializeToString()
        code, payload = await fetch(self.table, name, endpoint, DESCRIBE_ACTOR_TYPE, request,
                                    DESCRIBE_TIMEOUT, self.max_message)
        current = self.table.actors.get(name)
        if code == OK and current is not None:
            current.intent = actors_pb2.ActorTypeDescription.FromString(payload).intent

    async def list_actor_types(self) -> bytes:
        """ListActorTypes for every routed actor type (asking members what is unknown)."""
        await describe_all([r.name for r in self.table.actors.values() if not r.intent],
                           self.describe_actor_type)
        return actors_pb2.ListActorTypesResponse(types=[
            actors_pb2.ActorTypeSummary(name=r.name, intent=r.intent)
            for r in sorted(self.table.actors.values(), key=lambda r: r.name)
        ]).SerializeToString()

    def relayed(self, route_name: str, endpoint: Endpoint, code: int, gateway_failure: bool,
                latency: float) -> None:
        """Count a relayed stream against its endpoint and route."""
        endpoint.load.finished(0.0, self.table.clock(), abandoned=True)  # no rtt: a
        # stream's length says how long the conversation was, not how fast the endpoint
        endpoint.count(CODE_NAMES.get(code, str(code)), latency)
        if code != CANCELLED:  # the caller's going says nothing about the endpoint
            self.table.record(route_name, endpoint, code, gateway_failure)
        self.count_call(route_name, code, latency)

    def exhausted(self, route_name: str, kind: str) -> None:
        """A retry or hedge the budget refused."""
        self.table.metrics.budget_exhausted.labels(route_name, kind).inc()

    def count_call(self, route_name: str, code: int, seconds: float) -> None:
        """One call answered."""
        metrics = self.table.metrics
        child = self._call_counts.get((route_name, code))
        if child is None:
            child = self._call_counts[(route_name, code)] = metrics.calls.labels(
                route_name, CODE_NAMES.get(code, str(code)))
        child.inc()  # type: ignore[attr-defined]
        metrics.call_duration.labels(route_name).observe(seconds)


class Fetch(AttemptOwner):
    """A call the gateway makes itself (DescribeCapability to learn effects)."""

    def __init__(self) -> None:
        self.future: asyncio.Future[Attempt] = asyncio.get_running_loop().create_future()

    def attempt_done(self, attempt: Attempt) -> None:
        """Deliver the attempt."""
        if not self.future.done():
            self.future.set_result(attempt)


async def fetch(table: RoutingTable, route_name: str, endpoint: Endpoint, path: bytes,
                message: bytes, timeout: float, limit: int) -> tuple[int, bytes]:
    """Make one unary call to an endpoint; returns (status code, response message)."""
    owner = Fetch()
    attempt = Attempt(owner, table, route_name, endpoint, limit)
    headers = CallHeaders(path, [(b"content-type", b"application/grpc"), (b"te", b"trailers")],
                          asyncio.get_running_loop().time() + timeout, "", None, False, None)
    attempt.send(headers.upstream_headers(endpoint.upstream.authority,
                                          asyncio.get_running_loop().time()),
                 frame_message(message))
    try:
        async with asyncio.timeout(timeout):
            done = await owner.future
    except TimeoutError:
        attempt.cancel()
        return DEADLINE_EXCEEDED, b""
    if done.code != OK:
        return done.code, b""
    try:
        return OK, single_message(done.body, None)
    except WireError as exc:
        return exc.code, b""


async def describe_all(names: list[str], describe: Callable[[str], Awaitable[None]]) -> None:
    """Ask backends about ``names`` at once; what does not answer within the describe
    timeout stays unknown (a listing never waits longer)."""
    if names:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DESCRIBE_TIMEOUT):
                await asyncio.gather(*(describe(name) for name in names),
                                     return_exceptions=True)
