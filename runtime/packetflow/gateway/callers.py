"""Callers proven per call on the gateway's token listener: projected ServiceAccount tokens.

A pod without a workload certificate calls the token listener (TLS with the gateway's
certificate, no client certificate asked) with ``authorization: Bearer <token>``. Each call's
token is reviewed by the runtime's own :class:`~packetflow.identity.tokens.TokenReviewer`
(TokenReview, audience ``packetflow``, answers remembered by the token's hash): the caller it
proves replaces any ``packetflow-caller`` header, exactly as a client certificate's does, and
the token itself is never forwarded (backends see the gateway's certificate and the proven
caller, never a caller's credential). A call proving nobody is answered UNAUTHENTICATED naming
why, counted in ``packetflow_gateway_unauthenticated_calls_total{reason}``; nothing of it is
forwarded.

Still a frame relay: only the header block (read anyway) is looked at. A token the reviewer
remembers is decided at once; a new one holds its stream's events (headers, data, the
caller's reset) until the API server answers, then hands them on in order.
"""

from __future__ import annotations

import asyncio
import logging

from packetflow.gateway.h2 import Headers, Stream, StreamHandler
from packetflow.gateway.metrics import GatewayMetrics
from packetflow.gateway.proxy import UNAUTHENTICATED, Gateway, read_headers
from packetflow.identity.tokens import TokenReviewer
from packetflow.identity.workload import Principal
from packetflow.identity.x509 import AuthenticationError

log = logging.getLogger("packetflow.gateway")

_AUTHORIZATION = b"authorization"
_BEARER = b"bearer "


def bearer_token(headers: Headers) -> tuple[str | None, Headers]:
    """The call's bearer token (None without one) and its headers without ``authorization``
    (what may travel on)."""
    token = None
    kept: Headers = []
    for name, value in headers:
        if name == _AUTHORIZATION:
            if value[:7].lower() == _BEARER and value[7:].strip():
                token = value[7:].strip().decode("ascii", errors="replace")
            continue
        kept.append((name, value))
    return token, kept


class TokenCalls:
    """The token listener's ``on_request``: review each call's token, then route it as the
    caller the token proves (or refuse it)."""

    def __init__(self, gateway: Gateway, reviewer: TokenReviewer,
                 metrics: GatewayMetrics) -> None:
        self.gateway = gateway
        self.reviewer = reviewer
        self.metrics = metrics
        self._tasks: set[asyncio.Task[None]] = set()

    def on_request(self, stream: Stream, headers: Headers, end_stream: bool) -> StreamHandler:
        """A new call: served at once when its token's answer is remembered, else held
        until the review."""
        arrived = asyncio.get_running_loop().time()
        token, kept = bearer_token(headers)
        if token is None:
            return self._refuse(stream, kept, arrived, "no-credentials",
                                "the call carries no bearer token (authorization: Bearer "
                                "<projected ServiceAccount token, audience packetflow>)")
        try:
            principal = self.reviewer.known(token)
        except AuthenticationError as exc:
            return self._refuse(stream, kept, arrived, exc.reason, exc.message)
        if principal is not None:
            return self._serve(stream, kept, arrived, principal, end_stream)
        held = HeldCall()
        task = asyncio.get_running_loop().create_task(
            self._review(stream, token, kept, arrived, end_stream, held))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return held

    async def _review(self, stream: Stream, token: str, kept: Headers, arrived: float,
                      end_stream: bool, held: HeldCall) -> None:
        try:
            principal = await self.reviewer.review(token)
        except AuthenticationError as exc:
            if not held.gone and stream.open:
                stream.handler = self._refuse(stream, kept, arrived, exc.reason, exc.message)
            return
        if held.gone or not stream.open:
            return  # the caller left (or the connection did) while the API server was asked
        handler = self._serve(stream, kept, arrived, principal, end_stream)
        stream.handler = handler
        held.replay(handler)

    def _serve(self, stream: Stream, kept: Headers, arrived: float, principal: Principal,
               end_stream: bool) -> StreamHandler:
        call = read_headers(kept, arrived, principal.caller.encode())
        return self.gateway.serve(stream, call, end_stream)

    def _refuse(self, stream: Stream, kept: Headers, arrived: float, reason: str,
                message: str) -> StreamHandler:
        self.metrics.unauthenticated_calls.labels(reason).inc()
        log.info("caller refused", extra={"reason": reason, "detail": message,
                                          "listener": "token"})
        self.gateway.refuse(stream, read_headers(kept, arrived), UNAUTHENTICATED, message)
        return HeldCall(gone=True)

    def cancel(self) -> None:
        """Abandon the reviews under way (shutdown)."""
        for task in list(self._tasks):
            task.cancel()


class HeldCall:
    """A call's stream events while its token is reviewed, handed on in order afterwards;
    ``gone``: the call was answered or the caller left (events are dropped)."""

    __slots__ = ("events", "gone")

    def __init__(self, gone: bool = False) -> None:
        self.events: list[tuple[bool, bytes | Headers, bool]] = []  # (is data, what, end)
        self.gone = gone

    def on_headers(self, headers: Headers, end_stream: bool) -> None:
        """Request trailers: kept."""
        if not self.gone:
            self.events.append((False, headers, end_stream))

    def on_data(self, data: bytes, end_stream: bool) -> None:
        """Body bytes: kept (their stream credit returns once the call's handler has them)."""
        if not self.gone:
            self.events.append((True, data, end_stream))

    def on_reset(self, code: int, refused: bool) -> None:
        """The caller left: nothing is forwarded."""
        self.gone = True
        self.events.clear()

    def replay(self, handler: StreamHandler) -> None:
        """Hand the kept events to the call's handler."""
        events, self.events = self.events, []
        for is_data, what, end in events:
            if is_data:
                assert isinstance(what, bytes)
                handler.on_data(what, end)
            else:
                assert isinstance(what, list)
                handler.on_headers(what, end)
