"""SQLite backend (WAL): one connection on one writer thread, turns batched into group commits.

Concurrent turns of different actors queue their operations; the writer runs everything queued
in one transaction (each operation inside its own SAVEPOINT, so one refused write does not undo
the others) and one fsync covers the whole batch.

``inline=True`` runs each batch on the event loop's own thread instead: for a store written on
every call of a busy process (the federation audit log), handing each batch to a thread cost
more than the writes (the two threads pass the GIL back and forth at every system call the loop
makes); the loop then waits out each commit, and SQLite's occasional WAL checkpoint.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from packetflow.actors.errors import StoreUnavailable
from packetflow.actors.store import ActorStore, Op, Result, store_error
from packetflow.errors import PacketFlowError

T = TypeVar("T")
# Errors that mean "this data cannot be stored" rather than "the store is unavailable".
REFUSED: tuple[type[Exception], ...] = (sqlite3.IntegrityError, sqlite3.DataError,
                                        OverflowError)


def drive_sync(conn: Any, op: Op[T]) -> T:
    """Run a sans-I/O operation on a DB-API connection, statement by statement."""
    try:
        sql, params = next(op)
        while True:
            cursor = conn.execute(sql, params)
            rows = cursor.fetchall() if cursor.description is not None else []
            sql, params = op.send(Result(cursor.rowcount, rows))
    except StopIteration as stop:
        value: T = stop.value
        return value


def connect_sqlite(path: Path, synchronous: str = "FULL") -> sqlite3.Connection:
    """Open ``path`` in WAL mode with explicit transactions (autocommit off at the driver)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: a committed turn survives power loss too, not only a killed process.
    conn.execute(f"PRAGMA synchronous={synchronous}")
    return conn


@dataclass
class SqliteActorStore(ActorStore):
    """An actor type's store in one SQLite file."""

    path: Path = Path("actors.db")
    synchronous: str = "FULL"
    inline: bool = False
    _conn: sqlite3.Connection | None = field(default=None, init=False, repr=False)
    _executor: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)
    _pending: list[tuple[str, Op[Any], asyncio.Future[Any]]] = field(
        default_factory=list, init=False, repr=False)
    _drainer: asyncio.Task[None] | None = field(default=None, init=False, repr=False)

    async def open(self) -> None:
        """Create the file, switch to WAL and create the tables."""
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"sqlite-{self.actor_type}")
        loop = asyncio.get_running_loop()
        try:
            self._conn = await loop.run_in_executor(self._executor, self._connect)
        except Exception as exc:  # not a database, unreadable, disk full...
            await self.close()
            raise StoreUnavailable(f"actor store of {self.actor_type}: cannot open "
                                   f"{self.path}: {exc}") from None

    def _connect(self) -> sqlite3.Connection:
        conn = connect_sqlite(self.path, self.synchronous)
        try:
            with conn:
                conn.execute("BEGIN")
                for statement in self.schema("BLOB", "REAL"):
                    conn.execute(statement)
        except BaseException:
            conn.close()
            raise
        return conn

    async def close(self) -> None:
        """Finish queued work, then close the connection and the writer thread."""
        while self._drainer is not None:
            await self._drainer
        if self._executor is not None:
            if self._conn is not None:
                await asyncio.get_running_loop().run_in_executor(self._executor,
                                                                 self._conn.close)
            self._executor.shutdown(wait=True)
        self._conn = self._executor = None

    async def run(self, name: str, op: Op[T]) -> T:
        """Queue ``op`` for the next group commit and wait for its result."""
        if self._conn is None:
            raise StoreUnavailable(f"actor store of {self.actor_type} is not open")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._pending.append((name, op, future))
        if self._drainer is None:
            self._drainer = loop.create_task(self._drain())
        try:
            return await future
        except PacketFlowError:
            raise
        except Exception as exc:
            raise store_error(self.actor_type, exc, REFUSED) from exc

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                started = time.perf_counter()
                ops = [op for _, op, _ in batch]
                try:
                    outcomes = self._execute(ops) if self.inline else \
                        await loop.run_in_executor(self._executor, self._execute, ops)
                except Exception as exc:  # the whole transaction failed (disk full, I/O)
                    outcomes = [(False, exc)] * len(batch)
                elapsed = time.perf_counter() - started
                for (name, _, future), (ok, value) in zip(batch, outcomes, strict=True):
                    if self.observe is not None:
                        self.observe(name, elapsed)
                    if future.done():
                        continue  # the caller went away; the write itself still happened
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)
        finally:
            self._drainer = None

    def run_inline(self, name: str, op: Op[T]) -> T:
        """Run ``op`` now, in a transaction of its own on this thread (an ``inline`` store:
        the caller batches); errors as :meth:`run` raises them."""
        if self._conn is None or not self.inline:
            raise StoreUnavailable(f"actor store of {self.actor_type} is not open inline")
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            # One operation, the whole transaction: no savepoint around it.
            result = drive_sync(conn, op)
            conn.execute("COMMIT")
        except Exception as exc:  # refused, or the transaction failed (disk full, I/O)
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(exc, PacketFlowError):
                raise
            raise store_error(self.actor_type, exc, REFUSED) from exc
        return result

    def _execute(self, ops: list[Op[Any]]) -> list[tuple[bool, Any]]:
        conn = self._conn
        assert conn is not None
        outcomes: list[tuple[bool, Any]] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for op in ops:
                conn.execute("SAVEPOINT op")
                try:
                    outcomes.append((True, drive_sync(conn, op)))
                    conn.execute("RELEASE op")
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    outcomes.append((False, exc))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return outcomes
