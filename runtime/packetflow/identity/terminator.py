"""Terminate mutual TLS in front of a plaintext gRPC server, one authenticated identity per
connection.

gRPC's own TLS (``ssl_server_credentials``) cannot insist on TLS 1.3, and a handshake it
refuses never reaches application code, so nobody could audit it. Here every connection is
accepted as TCP, upgraded with :mod:`ssl` (TLS 1.3 only), and its client certificate
authenticated by a caller-supplied function; every refusal (plaintext, an old TLS version, a
missing, unknown, expired or foreign certificate) is reported with the remote address and
whatever the certificate told. An accepted connection is relayed byte for byte to the inner
gRPC server over a Unix socket in a directory only this process's user can enter, from a
client socket bound to a unique abstract name: the inner server sees that name as the call's
``context.peer()``, and :meth:`MtlsTerminator.identity` maps it back to the identity.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from packetflow.identity.x509 import AuthenticationError

T = TypeVar("T")
log = logging.getLogger("packetflow.identity.tls")

HANDSHAKE_TIMEOUT = 10.0
# The read buffer of one direction that pauses the other side: a slow reader must slow the
# writer instead of growing memory.
HIGH_WATER = 256 * 1024


@dataclass(frozen=True)
class Refusal:
    """A connection refused before any request was read."""

    address: str  # the client's host:port
    reason: str  # stable short code: plaintext, tls-version, no-client-certificate, ...
    message: str
    certificate_der: bytes | None = None


@dataclass
class Connection(Generic[T]):
    """An accepted connection: who it is, since when, and both sides of the relay."""

    key: str  # the inner server's context.peer() for this connection
    address: str
    identity: T
    established: float = field(default_factory=time.time)
    downstream: asyncio.Transport | None = None
    upstream: asyncio.Transport | None = None

    def close(self, abort: bool = False) -> None:
        """Close both sides (calls in flight on it fail); ``abort`` drops buffered data."""
        for transport in (self.downstream, self.upstream):
            if transport is not None:
                transport.abort() if abort else transport.close()


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


class _Pipe(asyncio.Protocol):
    """One direction's receiving end: writes what it reads to ``target``, with backpressure."""

    def __init__(self, on_lost: Callable[[], None]) -> None:
        self.transport: asyncio.Transport | None = None
        self.target: asyncio.Transport | None = None
        self.pending: list[bytes] = []
        self.on_lost = on_lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=HIGH_WATER)

    def connect(self, target: asyncio.Transport) -> None:
        """Start relaying to ``target`` (data that came first is sent first)."""
        self.target = target
        for chunk in self.pending:
            target.write(chunk)
        self.pending = []

    def data_received(self, data: bytes) -> None:
        if self.target is None:
            self.pending.append(data)
        else:
            self.target.write(data)

    def pause_writing(self) -> None:
        # Our transport's write buffer is full: stop reading from the side that fills it.
        if self.target is not None:
            self.target.pause_reading()

    def resume_writing(self) -> None:
        if self.target is not None:
            self.target.resume_reading()

    def eof_received(self) -> bool | None:
        # Half-close passes through where both sides can (TLS has no half-close: closing).
        tls = self.transport is not None and self.transport.get_extra_info("ssl_object")
        if not tls and self.target is not None and self.target.can_write_eof():
            self.target.write_eof()
            return True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.target is not None:
            self.target.close()
        self.on_lost()


class MtlsTerminator(Generic[T]):
    """Accept TLS 1.3 connections, authenticate each, relay the accepted ones inward.

    ``context()`` gives the SSL context for the next handshake (rotation: return a new one);
    ``authenticate(der)`` maps the client's leaf certificate (``None`` when it sent none) to
    an identity or raises :class:`AuthenticationError`; ``on_refused`` hears every refusal.
    """

    def __init__(self, *, context: Callable[[], ssl.SSLContext],
                 authenticate: Callable[[bytes | None], T],
                 on_refused: Callable[[Refusal], None],
                 on_accepted: Callable[[Connection[T]], None] | None = None,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
        self.context = context
        self.authenticate = authenticate
        self.on_refused = on_refused
        self.on_accepted = on_accepted
        self.handshake_timeout = handshake_timeout
        self.connections: dict[str, Connection[T]] = {}
        self.handshakes = 0  # accepted handshakes, for metrics
        self._names = itertools.count(1)
        # Abstract socket names are host-wide: pid and a random token keep ours apart.
        self._prefix = f"packetflow-{os.getpid()}-{secrets.token_hex(4)}"
        self._inner_path = ""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int, inner_path: str) -> int:
        """Listen on ``host:port`` (0: any free port), relaying to the Unix socket
        ``inner_path``; returns the port."""
        self._inner_path = inner_path
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Accepting(self), host, port,
                                                reuse_address=True)
        sockets = self._server.sockets
        return int(sockets[0].getsockname()[1]) if sockets else port

    def identity(self, peer: str) -> T | None:
        """The identity of the connection the inner server calls ``peer`` (its
        ``context.peer()``); ``None`` for a connection that did not come through here."""
        found = self.connections.get(peer)
        return None if found is None else found.identity

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
        key = ""
        downstream = _Pipe(lambda: self._forget(key))
        try:
            tls = await asyncio.get_running_loop().start_tls(
                transport, downstream, self.context(), server_side=True,
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
        # start_tls does not call connection_made (the transport is its return value).
        downstream.connection_made(tls)
        tls.pause_reading()  # nothing is read, let alone relayed, before authentication
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
        key = f"{self._prefix}-{next(self._names)}"
        connection = Connection(f"unix-abstract:{key}", address, identity, downstream=tls)
        try:
            upstream = await self._connect_inner(key, downstream)
        except asyncio.CancelledError:
            tls.abort()
            raise
        except OSError as exc:
            tls.abort()
            log.error("cannot reach the inner server at %s: %s", self._inner_path, exc)
            return
        connection.upstream = upstream
        self.connections[connection.key] = connection
        self.handshakes += 1
        if self.on_accepted is not None:
            self.on_accepted(connection)
        tls.resume_reading()

    async def _connect_inner(self, key: str, downstream: _Pipe) -> asyncio.Transport:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(f"\0{key}")
            sock.setblocking(False)
            await loop.sock_connect(sock, self._inner_path)
        except OSError:
            sock.close()
            raise
        upstream_pipe = _Pipe(lambda: downstream.transport.close()
                              if downstream.transport is not None else None)
        transport, _ = await loop.create_unix_connection(lambda: upstream_pipe, sock=sock)
        assert downstream.transport is not None
        upstream_pipe.connect(downstream.transport)
        downstream.connect(transport)
        return transport

    def _forget(self, key: str) -> None:
        self.connections.pop(f"unix-abstract:{key}", None)


class _Accepting(asyncio.Protocol):
    """A new TCP connection, held still until the TLS upgrade takes it over."""

    def __init__(self, terminator: MtlsTerminator[Any]) -> None:
        self.terminator = terminator

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        # Paused at once: the client hello must reach the TLS layer, not this protocol.
        transport.pause_reading()
        self.terminator._accept(transport)
