"""SQL databases behind the runtime's small stores: SQLite (the embedded default, one worker
thread so the event loop never blocks) or a shared PostgreSQL, with one dialect of SQL
(``?`` placeholders, turned into psycopg's ``%s``)."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar

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


class PostgresDatabase:
    """A shared PostgreSQL; open with :meth:`connect`."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection  # psycopg.AsyncConnection, autocommit
        self.lock = asyncio.Lock()  # one connection: one statement at a time

    @classmethod
    async def connect(cls, dsn: str, schema: Sequence[str] = ()) -> PostgresDatabase:
        """Connect and run the ``schema`` statements (``CREATE ... IF NOT EXISTS``)."""
        import psycopg  # loaded only by runtimes configured for a shared store

        connection = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        for statement in schema:
            await connection.execute(statement)
        return cls(connection)

    async def run(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Execute with psycopg's placeholders."""
        async with self.lock:
            cursor = await self.connection.execute(sql.replace("?", "%s"), args)
            return list(await cursor.fetchall()) if cursor.description else []

    async def aclose(self) -> None:
        """Close the connection."""
        await self.connection.close()


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
