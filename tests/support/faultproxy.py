"""A TCP proxy that injects network faults, for the fault tests and the soak bench.

``FaultProxy(upstream)`` listens on 127.0.0.1 (port 0: a free one) and forwards every
connection to ``upstream`` (``host:port``). Its ``fault`` can be changed at any moment and
applies to the connections already open as well as to new ones:

- ``None``: bytes pass through.
- ``Fault.latency(seconds)``: every chunk, in each direction, waits ``seconds`` first.
- ``Fault.stall()``: nothing is forwarded (bytes wait in the proxy) until the fault changes;
  then what waited flows on.
- ``Fault.half_open()``: the peer vanished without FIN or RST (a crashed host, a flushed NAT
  entry): connections stay established but what is sent is dropped, both ways, for good; a
  connection that saw this never carries bytes again, even after the fault is lifted.
- ``Fault.reset()``: every open connection is reset (RST), and new ones are reset on accept.
- ``Fault.drop(every)``: one byte in ``every`` is dropped (the stream arrives corrupted).

The proxy runs on the caller's event loop (``async with FaultProxy(...)``), or on a thread of
its own (:class:`ProxyThread`) when the caller's loop must not be disturbed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

CHUNK = 64 * 1024


@dataclass(frozen=True)
class Fault:
    """One kind of fault and its parameter."""

    kind: str  # latency | stall | half_open | reset | drop
    seconds: float = 0.0
    every: int = 0

    @classmethod
    def latency(cls, seconds: float) -> Fault:
        """Each chunk is delayed ``seconds``."""
        return cls("latency", seconds=seconds)

    @classmethod
    def stall(cls) -> Fault:
        """Nothing moves until the fault changes."""
        return cls("stall")

    @classmethod
    def half_open(cls) -> Fault:
        """Connections stay open and carry nothing, ever again."""
        return cls("half_open")

    @classmethod
    def reset(cls) -> Fault:
        """Every connection is reset."""
        return cls("reset")

    @classmethod
    def drop(cls, every: int) -> Fault:
        """One byte in ``every`` is lost."""
        return cls("drop", every=every)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST instead of FIN (SO_LINGER 0)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _open(writer: asyncio.StreamWriter | None) -> bool:
    """Whether ``writer``'s socket still holds a file descriptor."""
    sock = None if writer is None else writer.get_extra_info("socket")
    return sock is not None and sock.fileno() != -1


class _Link:
    """One proxied connection: the client side, the upstream side and its pumps."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.dead = False  # saw a half-open fault: carries nothing ever again
        self.dropped = 0  # bytes seen, for the drop fault's counting

    def reset(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                _reset(writer)


class FaultProxy:
    """The proxy: ``address`` is where to connect instead of ``upstream``."""

    def __init__(self, upstream: str, port: int = 0) -> None:
        host, _, upstream_port = upstream.rpartition(":")
        self.upstream = (host or "127.0.0.1", int(upstream_port))
        self.port = port
        self._fault: Fault | None = None
        self._changed = asyncio.Event()
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self.connections = 0  # accepted so far

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT`` of the listening side."""
        return f"127.0.0.1:{self.port}"

    @property
    def fault(self) -> Fault | None:
        """The fault applied now (None: a healthy network)."""
        return self._fault

    @fault.setter
    def fault(self, fault: Fault | None) -> None:
        self._fault = fault
        if fault is not None and fault.kind == "reset":
            for link in list(self._links):
                link.reset()
        if fault is not None and fault.kind == "half_open":
            for link in self._links:
                link.dead = True
        self._changed.set()  # stalled pumps look again
        self._changed = asyncio.Event()

    @property
    def open_connections(self) -> int:
        """Connections proxied now."""
        return len(self._links)

    @property
    def sockets(self) -> int:
        """File descriptors the proxy holds (listening and proxied sockets), so a leak check
        in the process that runs it can leave them out."""
        listening = len(self._server.sockets) if self._server is not None else 0
        return listening + sum(_open(writer) for link in self._links
                               for writer in (link.client, link.upstream))

    async def start(self) -> FaultProxy:
        """Listen (on the running loop)."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def close(self) -> None:
        """Stop listening and reset every connection."""
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.reset()
        # Reset links end their pumps; a task cancelled instead would be logged as an error
        # by asyncio's stream callback.
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=5)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        link = _Link(writer)
        fault = self._fault
        if fault is not None and fault.kind == "reset":
            _reset(writer)
            return
        self._links.add(link)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if fault is not None and fault.kind == "half_open":
                link.dead = True
                await self._pump(reader, None, link, True)  # read and drop until the client goes
                return
            try:
                up_reader, link.upstream = await asyncio.open_connection(*self.upstream)
            except OSError:
                _reset(writer)
                return
            await asyncio.gather(self._pump(reader, link.upstream, link, True),
                                 self._pump(up_reader, writer, link, False))
        finally:
            self._links.discard(link)
            self._tasks.discard(task)
            for side in (link.client, link.upstream):
                if side is not None:
                    side.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter | None,
                    link: _Link, from_client: bool) -> None:
        """Copy one direction, applying the fault in force to each chunk."""
        try:
            while chunk := await reader.read(CHUNK):
                chunk = await self._faulted(chunk, link)
                if chunk and writer is not None and not link.dead:
                    writer.write(chunk)
                    await writer.drain()
        except (ConnectionError, OSError):
            pass
        # One side closed: so does the other (as its FIN or RST would tell it), except that a
        # half-open link tells the client nothing until the client itself gives up.
        if from_client or not link.dead:
            for side in (link.client, link.upstream):
                if side is not None:
                    side.transport.abort()

    async def _faulted(self, chunk: bytes, link: _Link) -> bytes:
        while True:
            fault = self._fault
            if link.dead:
                return b""
            if fault is None:
                return chunk
            if fault.kind == "stall":
                await self._changed.wait()
                continue
            if fault.kind == "latency":
                await asyncio.sleep(fault.seconds)
                return chunk
            if fault.kind == "drop":
                kept = bytearray()
                for byte in chunk:
                    link.dropped += 1
                    if link.dropped % fault.every:
                        kept.append(byte)
                return bytes(kept)
            return chunk  # reset: the links were reset already


class ProxyThread:
    """A :class:`FaultProxy` on its own thread and event loop (for a blocking caller, or so
    the proxy's own work never counts against the loop under test)."""

    def __init__(self, upstream: str, port: int = 0) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fault-proxy",
                                       daemon=True)
        self.thread.start()
        self.proxy = self._call(FaultProxy(upstream, port).start())

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)

    @property
    def address(self) -> str:
        """Where to connect."""
        return self.proxy.address

    def set_fault(self, fault: Fault | None) -> None:
        """Change the fault (applied on the proxy's loop)."""
        async def change() -> None:
            self.proxy.fault = fault

        self._call(change())

    @property
    def sockets(self) -> int:
        """:attr:`FaultProxy.sockets`, read on the proxy's loop."""
        async def count() -> int:
            return self.proxy.sockets

        result: int = self._call(count())
        return result

    def close(self) -> None:
        """Stop the proxy and its thread."""
        self._call(self.proxy.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@contextlib.contextmanager
def proxy_thread(upstream: str) -> Iterator[ProxyThread]:
    """A :class:`ProxyThread` closed on exit."""
    proxy = ProxyThread(upstream)
    try:
        yield proxy
    finally:
        proxy.close()
