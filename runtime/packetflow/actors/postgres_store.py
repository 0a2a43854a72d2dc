"""PostgreSQL backend: psycopg 3 async connections, one transaction per operation.

A small fixed set of connections is shared through a queue (no pool dependency); every
operation runs in its own transaction, so fencing and reminders are exact across processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg

from packetflow.actors.errors import StoreUnavailable
from packetflow.actors.store import ActorStore, Op, Result, store_error
from packetflow.databases import STATEMENT_TIMEOUT_SECONDS, connect_postgres, detached
from packetflow.errors import PacketFlowError

T = TypeVar("T")
# Errors that mean "this data cannot be stored" (a NUL in text, a value out of range).
REFUSED: tuple[type[Exception], ...] = (psycopg.DataError, psycopg.IntegrityError)
_PLACEHOLDER = re.compile(r"\?")
_sql_cache: dict[str, str] = {}


def postgres_sql(sql: str) -> str:
    """``?`` placeholders -> psycopg's ``%s`` (the shared SQL never contains a literal ``?``)."""
    converted = _sql_cache.get(sql)
    if converted is None:
        converted = _sql_cache[sql] = _PLACEHOLDER.sub("%s", sql.replace("%", "%%"))
    return converted


async def drive_async(conn: psycopg.AsyncConnection[Any], op: Op[T]) -> T:
    """Run a sans-I/O operation on an async psycopg connection."""
    try:
        sql, params = next(op)
        while True:
            cursor = await conn.execute(postgres_sql(sql), params)
            rows = await cursor.fetchall() if cursor.description is not None else []
            sql, params = op.send(Result(cursor.rowcount, list(rows)))
    except StopIteration as stop:
        value: T = stop.value
        return value


@dataclass
class PostgresActorStore(ActorStore):
    """An actor type's store in a PostgreSQL database (shared by every replica).

    Each operation is bounded by ``timeout`` seconds (connecting included); a connection that
    failed, timed out or was cancelled mid-operation is never reused: its slot reconnects on
    its next use, so the store recovers by itself once the server is back.
    """

    dsn: str = ""
    connections: int = 4
    timeout: float = STATEMENT_TIMEOUT_SECONDS
    _idle: asyncio.Queue[list[psycopg.AsyncConnection[Any] | None]] | None = field(
        default=None, init=False, repr=False)
    _slots: list[list[psycopg.AsyncConnection[Any] | None]] = field(
        default_factory=list, init=False, repr=False)

    @property
    def shared(self) -> bool:
        """PostgreSQL is reachable from every replica."""
        return True

    async def open(self) -> None:
        """Connect and create the tables (idempotent; a lock serialises concurrent starts)."""
        try:
            self._idle = asyncio.Queue()
            for _ in range(self.connections):
                slot: list[psycopg.AsyncConnection[Any] | None] = [
                    await connect_postgres(self.dsn)]
                self._slots.append(slot)
                self._idle.put_nowait(slot)
            conn = self._slots[0][0]
            assert conn is not None
            async with conn.transaction():
                # Two runtimes starting together must not race on CREATE TABLE IF NOT EXISTS.
                await conn.execute("SELECT pg_advisory_xact_lock(7410501)")
                for statement in self.schema("BYTEA", "DOUBLE PRECISION"):
                    await conn.execute(statement)
        except Exception as exc:  # unreachable, a malformed DSN, refused credentials...
            await self.close()
            raise StoreUnavailable(f"actor store of {self.actor_type}: cannot connect to "
                                   f"PostgreSQL: {exc}".strip()) from None

    async def close(self) -> None:
        """Close every connection."""
        for slot in self._slots:
            if slot[0] is not None:
                with contextlib.suppress(Exception):
                    await slot[0].close()
                slot[0] = None
        self._slots.clear()
        self._idle = None

    async def run(self, name: str, op: Op[T]) -> T:
        """Run ``op`` in one transaction on a free connection, within ``timeout``; a caller
        that gives up (its deadline, a cancellation) is not held while psycopg cancels the
        statement at the server (up to 10 s): that finishes in the background, on a
        connection the slot no longer uses."""
        idle = self._idle
        if idle is None:
            raise StoreUnavailable(f"actor store of {self.actor_type} is not open")
        slot = await idle.get()
        started = time.perf_counter()
        holder = [slot[0]]  # the connection this transaction uses (connected if None)
        slot[0] = None  # back once the transaction ended well, or the SQL was refused

        def refused(exc: BaseException) -> bool:
            conn = holder[0]
            return isinstance(exc, PacketFlowError) or (
                isinstance(exc, REFUSED) and conn is not None and not conn.broken)

        try:
            result = await detached(self._transaction(holder, op), holder, self.timeout,
                                    refused)
            slot[0] = holder[0]
            return result
        except BaseException as exc:
            if refused(exc):
                slot[0] = holder[0]
            # Otherwise lost, timed out or cancelled mid-transaction: never reuse that
            # connection (detached closes it); the slot reconnects on its next use.
            if isinstance(exc, PacketFlowError):
                raise
            if isinstance(exc, TimeoutError):
                raise StoreUnavailable(f"actor store of {self.actor_type}: no answer from "
                                       f"PostgreSQL within {self.timeout:g}s") from None
            if isinstance(exc, Exception):
                raise store_error(self.actor_type, exc, REFUSED) from exc
            raise
        finally:
            if self.observe is not None:
                self.observe(name, time.perf_counter() - started)
            idle.put_nowait(slot)

    async def _transaction(self, holder: list[psycopg.AsyncConnection[Any] | None],
                           op: Op[T]) -> T:
        conn = holder[0]
        if conn is None:
            conn = holder[0] = await connect_postgres(self.dsn)
        async with conn.transaction():
            return await drive_async(conn, op)
