"""SQL databases behind the runtime's small stores: SQLite (the embedded default, one worker
thread so the event loop never blocks) or a shared PostgreSQL, with one dialect of SQL
(``?`` placeholders, turned into psycopg's ``%s``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar

from packetflow.errors import Unavailable

log = logging.getLogger("packetflow.databases")
T = TypeVar("T")


class Database(Protocol):
    """Runs one SQL statement (``?`` placeholders) and returns its rows."""

    async def run(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Execute; committed when it returns."""
        ...

    async def aclose(self) -> None:
        """Release the connection."""
        ...


class SqliteDatabase:
    """SQLite (WAL) on one worker thread; ``schema`` statements run when it opens."""

    def __init__(self, path: Path | str, schema: Sequence[str] = (),
                 thread_name: str = "sqlite") -> None:
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        for statement in schema:
            self.db.execute(statement)

    async def run(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Execute off the event loop."""
        def execute() -> list[tuple[Any, ...]]:
            return self.db.execute(sql, args).fetchall()

        return await asyncio.get_running_loop().run_in_executor(self.worker, execute)

    async def aclose(self) -> None:
        """Finish pending statements, then close."""
        await asyncio.get_running_loop().run_in_executor(self.worker, self.db.close)
        self.worker.shutdown(wait=True)


# Bounds on what a lost network costs: a connection attempt, and (TCP keepalives) how long a
# dead idle connection goes unnoticed. A DSN that sets any of these wins.
POSTGRES_CONNECT_DEFAULTS: dict[str, Any] = {
    "connect_timeout": 5, "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 3,
    "keepalives_count": 3}
# The longest one statement of a small store may take before its connection is given up.
STATEMENT_TIMEOUT_SECONDS = 10.0


async def connect_postgres(dsn: str) -> Any:
    """An autocommit ``psycopg.AsyncConnection`` with a connect timeout and TCP keepalives
    (unless the DSN sets its own)."""
    import psycopg  # loaded only by runtimes configured for a shared store
    from psycopg.conninfo import conninfo_to_dict

    given = conninfo_to_dict(dsn)
    extra = {k: v for k, v in POSTGRES_CONNECT_DEFAULTS.items() if k not in given}
    try:
        return await psycopg.AsyncConnection.connect(dsn, autocommit=True, **extra)
    except BaseException as exc:
        # psycopg raises a timed-out or cancelled connect from a frame that still holds the
        # half-made connection, its socket open: whoever keeps the exception (a log record,
        # a task, an error chained to it) would keep the socket. Release it now.
        traceback.clear_frames(exc.__traceback__)
        raise


def connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` means the server or the network failed (retry later), not the SQL."""
    import psycopg

    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError | TimeoutError
                      | OSError)


def _refused(exc: BaseException) -> bool:
    """The server refused the SQL (the connection is fine), as opposed to a lost one."""
    return isinstance(exc, Exception) and not connection_lost(exc)


async def detached(work: Coroutine[Any, Any, T], holder: list[Any], timeout: float,
                   keep: Callable[[BaseException], bool] = _refused) -> T:
    """Await ``work`` (statements on the connection ``holder[0]``, which it may set) for up
    to ``timeout``. On a failure ``keep`` does not forgive, and whenever the caller stops
    waiting (the timeout, a cancellation), the connection is closed once ``work`` has ended,
    and ``work`` is cancelled in the background: psycopg's cancellation of a statement waits
    for the server (up to 10 s), which must not hold the caller."""
    task = asyncio.ensure_future(work)
    try:
        async with asyncio.timeout(timeout):
            return await asyncio.shield(task)
    except BaseException as exc:
        if not (task.done() and keep(exc)):
            task.cancel()
            task.add_done_callback(lambda done: _close_after(done, holder[0]))
        raise


def _close_after(work: asyncio.Future[Any], connection: Any) -> None:
    """``work`` ended: close its connection without a goodbye (the network may be gone); its
    outcome was reported to the caller already."""
    if not work.cancelled():
        work.exception()  # retrieved: asyncio would log it as never retrieved
    if connection is not None:
        with contextlib.suppress(Exception):
            connection.pgconn.finish()


class PostgresDatabase:
    """A shared PostgreSQL on one connection, opened with :meth:`connect`, reopened after the
    server or the network failed; such a failure (or a statement past ``timeout``) raises
    ``Unavailable`` and the next statement reconnects."""

    def __init__(self, dsn: str, connection: Any, what: str = "PostgreSQL",
                 timeout: float = STATEMENT_TIMEOUT_SECONDS) -> None:
        self.dsn = dsn
        self.connection: Any = connection  # psycopg.AsyncConnection, autocommit; None: lost
        self.what = what
        self.timeout = timeout
        self.lock = asyncio.Lock()  # one connection: one statement at a time

    @classmethod
    async def connect(cls, dsn: str, schema: Sequence[str] = (),
                      what: str = "PostgreSQL") -> PostgresDatabase:
        """Connect and run the ``schema`` statements (``CREATE ... IF NOT EXISTS``)."""
        connection = await connect_postgres(dsn)
        for statement in schema:
            await connection.execute(statement)
        return cls(dsn, connection, what)

    async def run(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Execute with psycopg's placeholders (reconnecting first if the connection was
        lost)."""
        async with self.lock:
            holder = [self.connection]
            self.connection = None  # back once the statement ended well or SQL was refused
            try:
                rows = await detached(self._execute(holder, sql, args), holder, self.timeout)
            except BaseException as exc:
                if _refused(exc):
                    self.connection = holder[0]
                    raise
                # Lost, timed out or cancelled mid-statement: its state is unknown, never reuse
                # (detached closes it).
                if isinstance(exc, Exception):
                    raise Unavailable(f"{self.what} is unreachable: "
                                      f"{str(exc).strip() or type(exc).__name__}") from None
                raise
            self.connection = holder[0]
            return rows

    async def _execute(self, holder: list[Any], sql: str,
                       args: Sequence[Any]) -> list[tuple[Any, ...]]:
        if holder[0] is None:
            holder[0] = await connect_postgres(self.dsn)
        cursor = await holder[0].execute(sql.replace("?", "%s"), args)
        return list(await cursor.fetchall()) if cursor.description else []

    async def aclose(self) -> None:
        """Close the connection."""
        async with self.lock:
            if self.connection is not None:
                with contextlib.suppress(Exception):
                    await self.connection.close()
                self.connection = None


async def open_shared_or_local(what: str, variable: str, dsn: str | None,
                               shared: Callable[[str], Awaitable[T]], state_dir: Path,
                               local: Callable[[Path], T], memory: Callable[[], T]) -> T:
    """A store on the shared PostgreSQL when ``dsn`` is set (a bad one ends the process,
    naming ``variable``), else in SQLite under the state dir, else (not writable) in memory."""
    if dsn:
        try:
            return await shared(dsn)
        except Exception as exc:  # psycopg's errors: the DSN or the server
            raise SystemExit(f"error: {what} ({variable}): {exc}") from None

    def in_state_dir() -> T:
        state_dir.mkdir(parents=True, exist_ok=True)
        return local(state_dir)

    try:
        return await asyncio.to_thread(in_state_dir)
    except (OSError, sqlite3.Error) as exc:
        log.warning("state dir %s is not usable (%s): %s kept in memory only", state_dir,
                    exc, what)
        return memory()
