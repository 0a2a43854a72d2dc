"""Terminate mutual TLS, one authenticated identity per connection.

gRPC's own TLS (``ssl_server_credentials``) cannot insist on TLS 1.3, and a handshake it
refuses never reaches application code, so nobody could audit it. Here every connection is
accepted as TCP, upgraded with :mod:`ssl` (TLS 1.3 only), and its client certificate
authenticated by a caller-supplied function; every refusal (plaintext, an old TLS version, a
missing, unknown, expired or foreign certificate) is reported with the remote address and
whatever the certificate told. An accepted connection's decrypted stream is handed to a
protocol the caller makes for that connection (it knows the connection's identity), in the
same process: no byte is relayed anywhere before it is understood.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from packetflow.identity.x509 import AuthenticationError

T = TypeVar("T")
log = logging.getLogger("packetflow.identity.tls")

HANDSHAKE_TIMEOUT = 10.0


@dataclass(frozen=True)
class Refusal:
    """A connection refused before any request was read."""

    address: str  # the client's host:port
    reason: str  # stable short code: plaintext, tls-version, no-client-certificate, ...
    message: str
    certificate_der: bytes | None = None


@dataclass
class Connection(Generic[T]):
    """An accepted connection: who it is, since when, and its decrypted transport."""

    key: str  # unique among this terminator's connections
    address: str
    identity: T
    established: float = field(default_factory=time.time)
    transport: asyncio.Transport | None = None

    def close(self, abort: bool = False) -> None:
        """Close the connection (calls in flight on it fail); ``abort`` drops buffered data."""
        if self.transport is not None:
            self.transport.abort() if abort else self.transport.close()


def classify_handshake_failure(exc: BaseException) -> tuple[str, str]:
    """A failed handshake -> (reason code, message)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "untrusted-certificate", f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").upper()
        if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST",
                      "UNKNOWN_PROTOCOL", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE"):
            return "plaintext", f"not a TLS client hello ({reason.lower()}): plaintext refused"
        if reason in ("UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION"):
            return "tls-version", "the client offered no TLS 1.3"
        return "tls-error", f"TLS handshake failed: {exc.reason or exc}"
    if isinstance(exc, TimeoutError):
        return "handshake-timeout", "no TLS handshake within the timeout"
    return "connection-error", f"connection failed during the handshake: {exc!r}"


class _Held(asyncio.Protocol):
    """A connection during its handshake and authentication: what arrives is kept for the
    protocol that will serve it."""

    def __init__(self, on_lost: Callable[[], None]) -> None:
        self.pending: list[bytes] = []
        self.lost = False
        self.on_lost = on_lost

    def data_received(self, data: bytes) -> None:
        self.pending.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.on_lost()


class MtlsTerminator(Generic[T]):
    """Accept TLS 1.3 connections, authenticate each, relay the accepted ones inward.

    ``context()`` gives the SSL context for the next handshake (rotation: return a new one);
    ``authenticate(der)`` maps the client's leaf certificate (``None`` when it sent none) to
    an identity or raises :class:`AuthenticationError`; ``on_refused`` hears every refusal;
    ``serve(connection)`` makes the protocol that reads an accepted connection (it must call
    :meth:`forget` when its connection is lost).
    """

    def __init__(self, *, context: Callable[[], ssl.SSLContext],
                 authenticate: Callable[[bytes | None], T],
                 on_refused: Callable[[Refusal], None],
                 serve: Callable[[Connection[T]], asyncio.Protocol],
                 on_accepted: Callable[[Connection[T]], None] | None = None,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
        self.context = context
        self.authenticate = authenticate
        self.on_refused = on_refused
        self.serve = serve
        self.on_accepted = on_accepted
        self.handshake_timeout = handshake_timeout
        self.connections: dict[str, Connection[T]] = {}
        self.handshakes = 0  # accepted handshakes, for metrics
        self._names = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: any free port); returns the port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Accepting(self), host, port,
                                                reuse_address=True)
        sockets = self._server.sockets
        return int(sockets[0].getsockname()[1]) if sockets else port

    def close_where(self, refuse: Callable[[T], bool]) -> int:
        """Close every connection whose identity ``refuse`` says no to; how many closed."""
        doomed = [c for c in self.connections.values() if refuse(c.identity)]
        for connection in doomed:
            connection.close()
        return len(doomed)

    async def stop(self) -> None:
        """Stop accepting and close every connection."""
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections.values()):
            connection.close(abort=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def _accept(self, transport: asyncio.Transport) -> None:
        task = asyncio.get_running_loop().create_task(self._handshake(transport))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handshake(self, transport: asyncio.Transport) -> None:
        peer = transport.get_extra_info("peername")
        address = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        key = f"{next(self._names)}"
        held = _Held(lambda: self.forget(key))
        try:
            tls = await asyncio.get_running_loop().start_tls(
                transport, held, self.context(), server_side=True,
                ssl_handshake_timeout=self.handshake_timeout)
        except asyncio.CancelledError:
            transport.abort()
            raise
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            transport.abort()
            reason, message = classify_handshake_failure(exc)
            self.on_refused(Refusal(address, reason, message))
            return
        assert tls is not None
        tls.pause_reading()  # nothing is read, let alone served, before authentication
        ssl_object = tls.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if ssl_object is not None and ssl_object.version() != "TLSv1.3":  # pragma: no cover
            tls.abort()  # the context allows nothing older; belt and braces
            self.on_refused(Refusal(address, "tls-version", "the session is not TLS 1.3", der))
            return
        try:
            identity = self.authenticate(der)
        except AuthenticationError as exc:
            tls.abort()
            self.on_refused(Refusal(address, exc.reason, exc.message, der))
            return
        if held.lost:
            return
        connection = Connection(key, address, identity, transport=tls)
        self.connections[key] = connection
        self.handshakes += 1
        if self.on_accepted is not None:
            self.on_accepted(connection)
        protocol = self.serve(connection)
        tls.set_protocol(protocol)
        protocol.connection_made(tls)
        for data in held.pending:  # what came with the handshake's last flight
            protocol.data_received(data)
        tls.resume_reading()

    def forget(self, key: str) -> None:
        """A connection ended: it leaves :attr:`connections`."""
        self.connections.pop(key, None)


class _Accepting(asyncio.Protocol):
    """A new TCP connection, held still until the TLS upgrade takes it over."""

    def __init__(self, terminator: MtlsTerminator[Any]) -> None:
        self.terminator = terminator

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        # Paused at once: the client hello must reach the TLS layer, not this protocol.
        transport.pause_reading()
        self.terminator._accept(transport)
