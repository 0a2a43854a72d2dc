"""A PostgreSQL connect given up half way (its caller's deadline, a cancellation, the connect
timeout) closes its socket at once, even while the exception that ended it is kept, as a log
record, a task or an error chained to it keeps it. psycopg raises it from a frame that still
holds the half-made connection; the network fault test counted these sockets as leaked file
descriptors (issue 15)."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator

from packetflow.databases import connect_postgres
from tests.conftest import eventually, open_sockets
from tests.support.faultproxy import Fault, FaultProxy

pytest_plugins = ["tests.support.postgres"]


@contextlib.asynccontextmanager
async def stalled(dsn: str) -> AsyncIterator[tuple[FaultProxy, str]]:
    """A proxy to the server of ``dsn`` that forwards nothing, and the DSN through it."""
    host, port = re.search(r"host=(\S+)", dsn), re.search(r"port=(\d+)", dsn)
    assert host and port, dsn
    async with FaultProxy(f"{host[1]}:{port[1]}") as proxy:
        proxy.fault = Fault.stall()  # the server's greeting never arrives
        yield proxy, re.sub(r"port=\d+", f"port={proxy.port}",
                            re.sub(r"host=\S+", "host=127.0.0.1", dsn))


async def test_a_cancelled_connect_closes_its_socket_while_its_error_is_kept(
        postgres_dsn: str) -> None:
    async with stalled(postgres_dsn) as (proxy, dsn):
        before = open_sockets() - proxy.sockets
        connecting = asyncio.create_task(connect_postgres(dsn))
        await eventually(lambda: proxy.connections == 1, timeout=30, what="the connect")
        await eventually(lambda: open_sockets() - proxy.sockets > before, timeout=30,
                         what="the client's socket")
        connecting.cancel()
        kept: list[BaseException] = []
        try:
            await connecting
        except asyncio.CancelledError as exc:
            kept.append(exc)  # as a log record or a failed call's error would
        assert kept
        await eventually(lambda: open_sockets() - proxy.sockets == before, timeout=30,
                         what="the abandoned connect's socket closed")


async def test_a_timed_out_connect_closes_its_socket_while_its_error_is_kept(
        postgres_dsn: str) -> None:
    async with stalled(postgres_dsn) as (proxy, dsn):
        before = open_sockets() - proxy.sockets
        kept: list[BaseException] = []
        try:
            await connect_postgres(dsn + " connect_timeout=2")
        except Exception as exc:  # psycopg.errors.ConnectionTimeout
            kept.append(exc)
        assert kept and "timeout" in str(kept[0]), kept
        await eventually(lambda: open_sockets() - proxy.sockets == before, timeout=30,
                         what="the timed-out connect's socket closed")
