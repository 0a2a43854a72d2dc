"""The federation gateway's data path: every federated ``Invoke``, in both directions,
read off its connection by the gateway's HTTP/2 machinery (:mod:`packetflow.gateway.h2`),
checked, forwarded, metered and audited.

Inbound, a peer's call on its authenticated mTLS connection is checked in order (connection
still trusted, capability exported to that peer, peer above the trust threshold, rate limit,
input contract) before anything reaches the local runtime, which gets the request message
as the peer sent it; the answer's output is checked before it leaves. Outbound, a local
caller's ``Invoke`` of an import is checked (the peer's trust, our pinned copy of its
contract) and sent on one reused mTLS connection per peer; the local port's other methods
are relayed to the gateway's own gRPC server.

Why not ``grpc.aio``: every call was decoded and re-encoded twice per gateway (server, then
client), and the exporter relayed every byte once more in Python between its TLS terminator
and its server. Here a call costs one HTTP/2 parse per hop; the gateway reads only the
request's capability and JSON input (checks, the audit's size and hash, the probe) and the
answer's output (its contract, price and hash).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

import grpc
import orjson
from google.protobuf.message import DecodeError

from packetflow.client import CallError
from packetflow.composition.remote import domain_error
from packetflow.context import CALLER_KEY, TRACE_ID_KEY
from packetflow.contracts import CompiledContract
from packetflow.errors import (
    Code,
    ContractViolation,
    FieldViolation,
    InvalidInput,
    NotServable,
    Overloaded,
    PacketFlowError,
    PermissionDenied,
    Unavailable,
    code_of,
)
from packetflow.federation import trust as dims
from packetflow.federation.audit import ALLOW, DENY, INBOUND, OUTBOUND, AuditRecord
from packetflow.federation.links import NOT_READ, ImportState, Inbound, PeerLink
from packetflow.federation.pricing import call_price
from packetflow.federation.ratelimit import TokenBucket
from packetflow.federation.sla import Sample, counts_as_failure
from packetflow.federation.store import AuditUnavailable
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
from packetflow.rpc import rich_status
from packetflow.v1 import federation_pb2, runtime_pb2

if TYPE_CHECKING:
    from packetflow.composition.remote import RemoteCaller
    from packetflow.federation.catalog import CatalogEntry, LocalCapability
    from packetflow.federation.observe import FederationMetrics
    from packetflow.federation.sla import SlaMeter
    from packetflow.federation.state import GatewayState
    from packetflow.federation.trust import TrustBook
    from packetflow.identity.terminator import MtlsTerminator
    from packetflow.identity.workload import WorkloadIdentity

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


# Metadata a client might send to claim an identity: never believed, always audited.
IDENTITY_METADATA = frozenset({CALLER_KEY, "packetflow-organization", "packetflow-peer",
                               "packetflow-spiffe-id", "x-forwarded-client-cert",
                               "x-spiffe-id"})
PROBE_KEY = "packetflow-federation-probe"
PROBE = PROBE_KEY.encode()
_ADMISSION_METADATA = frozenset({*(key.encode() for key in IDENTITY_METADATA), PROBE})
TRACE_KEY = TRACE_ID_KEY.encode()

def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def trace_of(metadata: Iterable[tuple[str, Any]]) -> str:
    """The caller's trace id (ours or W3C traceparent), or a new one."""
    found = None
    for key, value in metadata:
        if key == TRACE_ID_KEY:
            return str(value)
        if key == "traceparent" and found is None:
            parts = str(value).split("-")
            found = parts[1] if len(parts) == 4 else None
    return found or os.urandom(16).hex()


def identity_claims(metadata: Iterable[tuple[str, Any]]) -> list[tuple[str, str]]:
    """Identity metadata a client sent (ignored: identity is the certificate)."""
    return [(key, str(value)[:200]) for key, value in metadata if key in IDENTITY_METADATA]


_INVALID = object()


def _json(data: bytes) -> Any:
    try:
        return orjson.loads(data) if data else {}
    except orjson.JSONDecodeError:
        return _INVALID


def not_servable(name: str, imported: ImportState) -> CatalogEntry:
    """The import's pinned entry, or a refusal: Unavailable while its peer's catalog is
    still to be read (try again), NotServable when the catalog says no (a verdict)."""
    if imported.problem == NOT_READ:
        raise Unavailable(f"import {name}: {imported.problem}")
    if imported.problem is not None or imported.entry is None:
        raise NotServable(f"import {name}: {imported.problem}")
    return imported.entry


def _check(contract: CompiledContract, raw: bytes, root: str,
           value: Any = _INVALID) -> list[FieldViolation]:
    """The contract's violations by a JSON payload (parsed here unless ``value`` is given)."""
    value = _json(raw) if value is _INVALID else value
    if value is _INVALID:
        return [FieldViolation(root, "not valid JSON")]
    return contract.check(value, root)[1]


class GatewayCore(Protocol):
    """What the data path uses of its gateway (:class:`packetflow.federation.gateway.Gateway`
    is the one): the current state, the checks, the accounting and the connections."""

    metrics: FederationMetrics
    trust: TrustBook
    remote: RemoteCaller
    terminator: MtlsTerminator[Inbound]
    workload: WorkloadIdentity | None
    buckets: dict[tuple[str, str], TokenBucket]
    export_stats: dict[str, ExportStats]
    local: dict[str, LocalCapability]
    local_errors: dict[str, str]

    def current(self) -> GatewayState:
        """The state new work uses."""

    async def audit(self, record: AuditRecord) -> None:
        """Append ``record`` before the caller hears back."""

    def audit_writable(self) -> None:
        """AuditUnavailable while the audit log cannot be written."""

    def check_connection(self, identity: Inbound, state: GatewayState) -> None:
        """Refused unless the call's connection is still trusted."""

    def catalog_metadata(self, name: str) -> tuple[tuple[str, str], ...]:
        """The catalog version an import's answer was checked against."""

    def meter(self, side: str, peer: str, capability: str, sla: Any) -> SlaMeter:
        """The SLA meter of one side, peer and capability."""

    def peer_upstream(self, link: PeerLink, state: GatewayState) -> Upstream:
        """The reused mTLS connection to a peer."""

    async def refresh_local(self, only: str | None = None) -> LocalCapability | None:
        """Describe exported capabilities at the runtime; ``only``'s description."""

    def resolve_import(self, name: str) -> tuple[ImportState, PeerLink]:
        """An import by its local name (or ``peer/capability``) and its peer's link."""

    async def serve_catalog(self, identity: Inbound,
                            known_version: str) -> federation_pb2.Catalog:
        """The catalog of what is exported to a peer."""


class CallRecord:
    """A federated call on its way: when it started, its audit record's fields so far (the
    record is made once, when the call ends: no copy per step)."""

    __slots__ = ("decision", "fields", "started")

    def __init__(self, started: float, **fields: Any) -> None:
        self.started = started
        self.fields = fields
        self.decision = DENY

    def record(self, **outcome: Any) -> AuditRecord:
        """The audit record of the call, ended with ``outcome``."""
        return AuditRecord(**self.fields, **outcome)


@dataclass
class InboundCall:
    """An admitted inbound call: where its runtime is, what its answer is checked against."""

    call: CallRecord
    at: float
    export: Any
    probe: bool
    provides: CompiledContract
    runtime: str  # host:port


class Refused(Exception):
    """A refusal on its way to the audit log: the error the caller gets and a reason code."""

    def __init__(self, error: PacketFlowError, reason: str) -> None:
        super().__init__(error.message)
        self.error = error
        self.reason = reason


@dataclass
class ExportStats:
    """Counters of one export, for status."""

    calls: int = 0
    errors: int = 0
    sla_breaches: int = 0
    by_peer: dict[str, dict[str, int]] = field(default_factory=dict)

    def count(self, peer: str, ok: bool) -> None:
        """Count one allowed call."""
        self.calls += 1
        self.errors += not ok
        mine = self.by_peer.setdefault(peer, {"calls": 0, "errors": 0, "slaBreaches": 0})
        mine["calls"] += 1
        mine["errors"] += not ok



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
    """A whole error answer for ``error``, as :func:`packetflow.rpc.abort_for` gives it."""
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

    def __init__(self, gateway: GatewayCore, max_message: int = MAX_MESSAGE_BYTES) -> None:
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

    def __init__(self, gateway: GatewayCore) -> None:
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
        """The shared connection to a runtime address (mutual TLS as the gateway's workload,
        when it has one: a rotated certificate moves new calls to a new connection)."""
        found = self.upstreams.get(address)
        if found is None or found.retired:
            found = self.upstreams[address] = Upstream(address, self.gateway.workload)
        return found

    async def invoke(self, identity: Inbound, stream: Stream, headers: CallHeaders,
                     body: bytes) -> None:
        """Admit, forward, settle and answer one Invoke."""
        trace_id = headers.trace_id
        try:
            request = read_invoke(body, headers)
            # Only what admission reads (identity claims, the probe mark) is decoded.
            metadata = [(name.decode(errors="replace"), value.decode(errors="replace"))
                        for name, value in headers.forward if name in _ADMISSION_METADATA]
            inbound = await self.admit(identity, request.capability,
                                                  request.input_json, metadata, trace_id)
            # Only our own metadata goes on. In plaintext the caller is the peer its
            # certificate names; under zero trust the runtime's caller is this gateway's
            # workload certificate (a claim would be ignored, or refused from a forwarder).
            outgoing = [(_TRACE, trace_id.encode())]
            if self.gateway.workload is None:
                outgoing.append((_CALLER, f"federation:{identity.peer}".encode()))
            output, failed = await invoke(self.upstream(inbound.runtime), RUNTIME_INVOKE,
                                          body, outgoing, headers.deadline)
            await self.settle(inbound, output, None if failed is None else
                                         domain_error(failed, request.capability,
                                                      "the runtime"))
        except PacketFlowError as exc:
            stream.send_headers(error_trailers(exc, trace_id), end_stream=True)
            return
        answer(stream, output, trace_id)

    async def admit(self, identity: Inbound, capability: str, payload: bytes,
                    metadata: Sequence[tuple[str, str]], trace_id: str) -> InboundCall:
        """A peer calls one of our exports; the checks run in the module docstring's order
        and nothing may reach the capability before all of them pass (a refusal is audited
        and raised)."""
        gateway = self.gateway
        started = time.perf_counter()
        now = time.time()
        state = gateway.current()
        claims = identity_claims(metadata)
        call = CallRecord(
            started, at=now, direction=INBOUND, peer="", fingerprint="", capability=capability,
            bytes_in=len(payload), trace_id=trace_id, input_sha256=_sha256(payload),
            notes="ignored identity metadata: " + ", ".join(f"{k}={v}" for k, v in claims)
            if claims else "")
        try:
            gateway.check_connection(identity, state)
        except Refused as refused:
            await self.refuse_call(refused, call)
        peer = identity.peer
        call.fields.update(peer=peer, fingerprint=identity.certificate.fingerprint,
                           address=identity.address)
        peer_org = state.peers[peer].organization
        if any(name != CALLER_KEY and value not in (peer, peer_org) for name, value in claims):
            # Claiming to be someone else: a policy failure of this peer.
            gateway.trust.observe(peer, dims.SECURITY, False, now)
        export = state.exports.get(capability)
        if export is None or peer not in export.to:
            gateway.trust.observe(peer, dims.SECURITY, False, now)
            # The same answer whether the capability exists or not: nothing leaks.
            await self.refuse_call(Refused(PermissionDenied(
                f"capability {capability!r} is not exported to {peer}"), "not-exported"), call)
        sla = export.sla
        probe = (sla is not None and sla.probe is not None
                 and any(name == PROBE_KEY for name, _ in metadata)
                 and _json(payload) == sla.probe.input)
        refusal = gateway.trust.refusal(peer, now)
        if refusal is not None and not probe:
            await self.refuse_call(Refused(PermissionDenied(refusal), "trust"), call)
        if export.rate_limit is not None:
            bucket = gateway.buckets.get((peer, capability))
            if bucket is None:
                bucket = gateway.buckets[(peer, capability)] = TokenBucket.of(
                    export.rate_limit, time.monotonic())
            if not bucket.take(time.monotonic()):
                await self.refuse_call(Refused(Overloaded(
                    f"rate limit of {export.rate_limit.per_minute:g}/minute for {peer} on "
                    f"{capability!r}; retry in {bucket.retry_after():.1f}s"), "rate-limit"),
                    call)
        try:
            gateway.audit_writable()
        except AuditUnavailable as exc:
            await self.refuse_call(Refused(exc, "audit-unavailable"), call)
        call.decision = ALLOW
        local = gateway.local.get(capability) or await gateway.refresh_local(capability)
        if local is None:
            # The status the runtime answered the gateway with, not its address or details.
            why = gateway.local_errors.get(capability)
            await self.refuse_call(Refused(Unavailable(
                f"capability {capability!r} is not reachable here now" + (
                    f" (the runtime answered the federation gateway {why})" if why else "")),
                "unavailable"), call)
        requires, provides = local.checks
        violations = _check(requires, payload, "input")
        if violations:
            gateway.trust.observe(peer, dims.RELIABILITY, False, now)
            await self.refuse_call(Refused(InvalidInput(violations), "invalid-input"), call)
        gateway.trust.observe(peer, dims.SECURITY, True, now)
        gateway.trust.observe(peer, dims.RELIABILITY, True, now)
        return InboundCall(call, now, export, probe, provides,
                           await gateway.remote.resolver.resolve(
                               state.settings.runtime or capability))

    async def settle(self, inbound: InboundCall, output_bytes: bytes,
                     error: PacketFlowError | None) -> None:
        """An admitted call's answer from the runtime: its output checked, counted, metered
        and audited; raises the error the peer gets, if any."""
        gateway = self.gateway
        call = inbound.call
        peer, capability, export = call.fields["peer"], call.fields["capability"], \
            inbound.export
        output: Any = None
        if error is None:
            output = _json(output_bytes)
            violations = _check(inbound.provides, output_bytes, "output", output)
            if violations:
                error = ContractViolation(capability, violations)
        code = Code.OK if error is None else code_of(error)
        elapsed = time.perf_counter() - inbound.call.started
        gateway.export_stats.setdefault(capability, ExportStats()).count(peer, error is None)
        sla = export.sla
        if sla is not None:
            gateway.meter("exporter", peer, capability, sla).observe(
                Sample(inbound.at, elapsed, not counts_as_failure(code.value)))
        gateway.metrics.answered(INBOUND, peer, capability, code.value, elapsed)
        await gateway.audit(call.record(
            decision=ALLOW, code=code.value,
            reason="sla probe" if inbound.probe else
            (error.message[:500] if error is not None else "exported"),
            duration_ms=round(elapsed * 1000, 3), bytes_out=len(output_bytes),
            output_sha256=_sha256(output_bytes) if output_bytes else "",
            price=0.0 if inbound.probe else call_price(export.pricing, error is None, output),
            currency=export.pricing.currency if export.pricing else ""))
        if error is not None:
            raise error

    async def refuse_call(self, refused: Refused, call: CallRecord) -> NoReturn:
        """Audit, count and raise a refused inbound call."""
        gateway = self.gateway
        error, peer = refused.error, call.fields["peer"]
        code = code_of(error).value
        gateway.metrics.refusals.labels(INBOUND, peer, refused.reason).inc()
        gateway.metrics.calls.labels(INBOUND, peer, call.fields["capability"], code).inc()
        await gateway.audit(call.record(
            decision=call.decision, reason=f"{refused.reason}: {error.message}"[:500],
            code=code, duration_ms=round((time.perf_counter() - call.started) * 1000, 3)))
        raise error

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

    def __init__(self, gateway: GatewayCore, internal: Upstream) -> None:
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
            output = await self.invoke_import(request.capability, request.input_json,
                                                 trace_id, remaining)
        except PacketFlowError as exc:
            stream.send_headers(error_trailers(exc, trace_id), end_stream=True)
            return
        answer(stream, output, trace_id, [
            (name.encode(), value.encode())
            for name, value in gateway.catalog_metadata(request.capability)])

    async def invoke_import(self, name: str, payload: bytes, trace_id: str,
                            remaining: float | None, *, probe: bool = False) -> bytes:
        """A local caller uses an import: trust, contract, then the peer over mTLS."""
        gateway = self.gateway
        imported, link = gateway.resolve_import(name)
        started = time.perf_counter()
        now = time.time()
        state = gateway.current()
        peer, capability = imported.spec.peer, imported.spec.capability
        entry = not_servable(name, imported)
        call = CallRecord(
            started, at=now, direction=OUTBOUND, peer=peer, fingerprint=link.fingerprint,
            capability=capability, bytes_in=len(payload), trace_id=trace_id,
            input_sha256=_sha256(payload), address=state.peers[peer].endpoint)
        reason = "sla probe" if probe else f"import {name}"
        if link.identity_error is not None:
            await self._refuse(Unavailable(link.identity_error), "identity", call)
        refusal = gateway.trust.refusal(peer, now)
        if refusal is not None and not probe:
            await self._refuse(PermissionDenied(refusal), "trust", call)
        try:
            gateway.audit_writable()
        except AuditUnavailable as exc:
            await self._refuse(exc, "audit-unavailable", call)
        value = _json(payload)
        _, violations = imported.requires.check(value, "input") if value is not _INVALID \
            else ({}, [FieldViolation("input", "not valid JSON")])
        if violations:
            raise InvalidInput(violations)  # the local caller's mistake: nothing was sent
        error: PacketFlowError | None = None
        output_bytes = b""
        output: Any = None
        metadata = [(TRACE_KEY, trace_id.encode())]
        if probe:
            metadata.append((PROBE, b"1"))
        output_bytes, call_error = await invoke(
            gateway.peer_upstream(link, state), PEER_INVOKE, frame_message(
                runtime_pb2.InvokeRequest(capability=capability,
                                          input_json=payload).SerializeToString()),
            metadata, None if remaining is None
            else asyncio.get_running_loop().time() + remaining)
        if call_error is not None:
            error = domain_error(call_error, capability, peer)
        else:
            output = _json(output_bytes)
            _, violations = imported.provides.check(output, "output") \
                if output is not _INVALID else ({}, [FieldViolation("output", "not JSON")])
            if violations:
                error = ContractViolation(name, violations)
        elapsed = time.perf_counter() - started
        code = Code.OK if error is None else code_of(error)
        failed = counts_as_failure(code.value) or isinstance(error, ContractViolation)
        if code == Code.OK or failed:
            gateway.trust.observe(peer, dims.RELIABILITY, not failed, now)
        sla = entry.sla
        if sla is not None and sla.latency_p99_ms is not None and not failed:
            gateway.trust.observe(peer, dims.PERFORMANCE, elapsed * 1000 <= sla.latency_p99_ms,
                               now)
        if sla is not None:
            gateway.meter("importer", peer, capability, sla).observe(Sample(now, elapsed,
                                                                          not failed))
        price = 0.0 if probe else call_price(entry.pricing, error is None, output)
        gateway.metrics.answered(OUTBOUND, peer, capability, code.value, elapsed)
        await gateway.audit(call.record(
            decision=ALLOW, code=code.value, reason=reason if error is None
            else f"{reason}: {error.message}"[:500],
            duration_ms=round(elapsed * 1000, 3), bytes_out=len(output_bytes),
            output_sha256=_sha256(output_bytes) if output_bytes else "", price=price,
            currency=entry.pricing.currency if entry.pricing else ""))
        if error is not None:
            raise error
        return output_bytes

    async def _refuse(self, error: PacketFlowError, reason: str, call: CallRecord) -> NoReturn:
        """Audit, count and raise a refused outbound call."""
        gateway = self.gateway
        code = code_of(error).value
        peer = call.fields["peer"]
        gateway.metrics.refusals.labels(OUTBOUND, peer, reason).inc()
        gateway.metrics.calls.labels(OUTBOUND, peer, call.fields["capability"], code).inc()
        await gateway.audit(call.record(
            decision=DENY, code=code, reason=f"{reason}: {error.message}"[:500],
            duration_ms=round((time.perf_counter() - call.started) * 1000, 3)))
        raise error

    async def aclose(self) -> None:
        """Cancel calls in flight; close local connections and the inward one."""
        await self.cancel_calls()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        await self.internal.aclose()
