"""One HTTP/2 connection per backend address, shared by every route that uses it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from typing import Protocol

from packetflow.addresses import split_address
from packetflow.gateway.h2 import Connection, Stream, StreamHandler, StreamRefused
from packetflow.identity.tls import ALPN_H2

log = logging.getLogger("packetflow.gateway")

# After a failed connect, calls fail fast (as not delivered) for this long, doubling per
# failure up to the maximum, instead of every call dialling a dead address.
CONNECT_BACKOFF = 0.1
CONNECT_BACKOFF_MAX = 5.0
CONNECT_TIMEOUT = 5.0


def negotiated_h2(transport: asyncio.BaseTransport) -> bool:
    """Whether a TLS connection negotiated HTTP/2 (gRPC insists on ALPN ``h2``)."""
    ssl_object = transport.get_extra_info("ssl_object")
    return ssl_object is not None and ssl_object.selected_alpn_protocol() == ALPN_H2


class ClientTls(Protocol):
    """What a connection presents over TLS, and its generation: when that changes (a rotated
    certificate), new calls go on a new connection and the old one drains. A
    :class:`~packetflow.identity.workload.WorkloadIdentity` is one."""

    @property
    def generation(self) -> int:
        """Changes whenever the context would."""

    def client_ssl_context(self) -> ssl.SSLContext:
        """The TLS context of a new connection."""


class FixedTls:
    """One TLS context that never changes (whoever holds it replaces the upstream instead)."""

    generation = 0

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context

    def client_ssl_context(self) -> ssl.SSLContext:
        """The context."""
        return self._context


# Checks a TLS backend's certificate once the handshake is done (which workload it is);
# ValueError says why the connection may not be used.
PeerCheck = Callable[[asyncio.BaseTransport], None]


class ConnectFailed(Exception):
    """The backend could not be reached: nothing was sent, a retry elsewhere is safe."""


class Upstream:
    """A backend address (``host:port`` or ``unix:PATH``) and the connection to it; with
    ``tls``, TCP connections speak (mutual) TLS: the gateway's workload to its backends, a
    federation gateway to its peer."""

    def __init__(self, address: str, tls: ClientTls | None = None,
                 check_peer: PeerCheck | None = None) -> None:
        self.address = address
        self.tls = tls if not address.startswith("unix:") else None
        self.check_peer = check_peer  # with tls: is the backend the workload expected?
        self._generation = 0  # of the TLS material the connection presented
        self.authority = address.encode()
        self.conn: Connection | None = None
        self._connecting: asyncio.Future[Connection] | None = None
        self._retry_at = 0.0
        self._backoff = CONNECT_BACKOFF
        self.retired = False

    def stream(self, handler: StreamHandler) -> Stream | None:
        """A new stream on the live connection, or None when a connect is needed first.

        Raises StreamRefused when the connection is at the backend's stream limit.
        """
        conn = self.conn
        if conn is None or conn.going_away:
            return None
        if self.tls is not None and self.tls.generation != self._generation:
            # Our certificate rotated: calls in flight finish on the old connection.
            conn.goaway()
            return None
        return conn.open_stream(handler)

    async def connect(self) -> Connection:
        """The live connection, dialled if needed (one dial shared by all waiting calls)."""
        conn = self.conn
        if conn is not None and not conn.going_away and (
                self.tls is None or self.tls.generation == self._generation):
            return conn
        if self.retired:
            raise ConnectFailed(f"{self.address} left the routes")
        if self._connecting is None:
            if time.monotonic() < self._retry_at:
                raise ConnectFailed(f"{self.address} refused a connection moments ago")
            self._connecting = asyncio.ensure_future(self._dial())
            # Every waiter may have given up; the outcome must still count as retrieved.
            self._connecting.add_done_callback(
                lambda done: done.cancelled() or done.exception())
        try:
            return await asyncio.shield(self._connecting)
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None

    async def _dial(self) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                if self.address.startswith("unix:"):
                    _, conn = await loop.create_unix_connection(
                        lambda: Connection(server=False), self.address.removeprefix("unix:"))
                else:
                    host, port = split_address(self.address)
                    tls = self.tls
                    if tls is None:
                        _, conn = await loop.create_connection(
                            lambda: Connection(server=False), host, port)
                    else:
                        generation = tls.generation
                        transport, conn = await loop.create_connection(
                            lambda: Connection(server=False), host, port,
                            ssl=tls.client_ssl_context(), server_hostname=host)
                        if not negotiated_h2(transport):
                            transport.close()
                            raise ValueError("the backend did not negotiate HTTP/2 (ALPN h2)")
                        if self.check_peer is not None:
                            try:
                                self.check_peer(transport)
                            except ValueError:
                                transport.abort()  # before any stream was opened on it
                                raise
                        self._generation = generation
        except (OSError, TimeoutError, ValueError) as exc:
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, CONNECT_BACKOFF_MAX)
            raise ConnectFailed(f"cannot connect to {self.address}: "
                                f"{exc or type(exc).__name__}") from None
        self._backoff = CONNECT_BACKOFF
        self._retry_at = 0.0
        if self.retired:  # left the routes while dialling
            conn.goaway()
            raise ConnectFailed(f"{self.address} left the routes")
        if self.conn is not None:
            self.conn.goaway()  # made with a rotated certificate: it drains
        self.conn = conn
        return conn

    def retire(self) -> None:
        """The address left the routes: finish open calls, then close (drain, not cut)."""
        self.retired = True
        if self.conn is not None:
            self.conn.goaway()

    async def aclose(self) -> None:
        """Close at once (shutdown)."""
        self.retired = True
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(BaseException):
                await self._connecting
        conn = self.conn
        if conn is not None and conn.transport is not None:
            # Abort: a TLS close would wait for the peer's close_notify (up to 30 s).
            conn.transport.abort()
            with contextlib.suppress(asyncio.CancelledError):
                await conn.closed


__all__ = ["ConnectFailed", "StreamRefused", "Upstream"]
