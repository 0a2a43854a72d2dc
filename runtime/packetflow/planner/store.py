"""Where the planner keeps outcomes and cached plans: SQLite under the state dir, or a
PostgreSQL every replica shares (``PACKETFLOW_PLANNER_STORE_DSN``), as the feedback store.

One set of SQL serves both databases (``?`` placeholders, turned into ``%s`` for psycopg).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import orjson

from packetflow.planner.learning import CacheEntry, Outcome

log = logging.getLogger("packetflow.planner.store")

OUTCOMES_READ = 2000  # the most recent outcomes involving the candidates that are read
CACHE_READ = 200

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS pf_plan_outcomes (trace_id TEXT NOT NULL, terms TEXT NOT NULL, "
    "capabilities TEXT NOT NULL, ok INTEGER NOT NULL, failed TEXT NOT NULL, "
    "latency_ms DOUBLE PRECISION NOT NULL, at DOUBLE PRECISION NOT NULL)",
    "CREATE INDEX IF NOT EXISTS pf_plan_outcomes_at ON pf_plan_outcomes (at)",
    # One row per capability of an outcome: "outcomes that used X" is an index lookup.
    "CREATE TABLE IF NOT EXISTS pf_plan_uses (capability TEXT NOT NULL, trace_id TEXT NOT NULL, "
    "at DOUBLE PRECISION NOT NULL)",
    "CREATE INDEX IF NOT EXISTS pf_plan_uses_capability ON pf_plan_uses (capability, at)",
    "CREATE TABLE IF NOT EXISTS pf_plan_cache (key TEXT PRIMARY KEY, signature TEXT NOT NULL, "
    "terms TEXT NOT NULL, constants TEXT NOT NULL, manifest TEXT NOT NULL, "
    "traces TEXT NOT NULL, at DOUBLE PRECISION NOT NULL)",
    "CREATE INDEX IF NOT EXISTS pf_plan_cache_signature ON pf_plan_cache (signature, at)",
)


class Database(Protocol):
    """Runs one SQL statement (``?`` placeholders) and returns its rows."""

    async def run(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Execute; committed when it returns."""
        ...

    async def aclose(self) -> None:
        """Release the connection."""
        ...


class SqliteDatabase:
    """SQLite (WAL) on one worker thread."""

    def __init__(self, path: Path | str) -> None:
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="planner-store")
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        for statement in SCHEMA:
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
    async def connect(cls, dsn: str) -> PostgresDatabase:
        """Connect and create the tables if needed."""
        import psycopg  # loaded only by runtimes configured for a shared store

        connection = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        for statement in SCHEMA:
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


class PlannerStore:
    """Outcomes and cached plans over a :class:`Database`."""

    def __init__(self, database: Database) -> None:
        self.database = database

    async def record(self, outcome: Outcome) -> None:
        """Keep one execution's outcome."""
        await self.database.run(
            "INSERT INTO pf_plan_outcomes VALUES (?, ?, ?, ?, ?, ?, ?)", outcome.trace_id,
            " ".join(outcome.terms), " ".join(outcome.capabilities), int(outcome.ok),
            outcome.failed, outcome.latency_ms, outcome.at)
        for capability in outcome.capabilities:
            await self.database.run("INSERT INTO pf_plan_uses VALUES (?, ?, ?)", capability,
                                    outcome.trace_id, outcome.at)

    async def outcomes(self, capabilities: Sequence[str],
                       limit: int = OUTCOMES_READ) -> list[Outcome]:
        """The most recent outcomes that used any of ``capabilities``."""
        if not capabilities:
            return []
        marks = ", ".join("?" for _ in capabilities)
        rows = await self.database.run(
            "SELECT o.trace_id, o.terms, o.capabilities, o.ok, o.failed, o.latency_ms, o.at "
            "FROM pf_plan_outcomes o WHERE o.trace_id IN (SELECT trace_id FROM pf_plan_uses "
            f"WHERE capability IN ({marks})) ORDER BY o.at DESC LIMIT ?",
            *capabilities, limit)
        return [Outcome(str(t), tuple(str(terms).split()), tuple(str(caps).split()), bool(ok),
                        str(failed), float(latency), float(at))
                for t, terms, caps, ok, failed, latency, at in rows]

    async def cache_put(self, entry: CacheEntry) -> None:
        """Keep (or replace) a cached plan."""
        await self.database.run("DELETE FROM pf_plan_cache WHERE key = ?", entry.key)
        await self.database.run(
            "INSERT INTO pf_plan_cache VALUES (?, ?, ?, ?, ?, ?, ?)", entry.key,
            entry.signature, " ".join(entry.terms), entry.constants, entry.manifest,
            orjson.dumps(list(entry.traces)).decode(), entry.at)

    async def cached(self, signature: str, limit: int = CACHE_READ) -> list[CacheEntry]:
        """The most recent cached plans with this signature."""
        rows = await self.database.run(
            "SELECT key, signature, terms, constants, manifest, traces, at FROM pf_plan_cache "
            "WHERE signature = ? ORDER BY at DESC LIMIT ?", signature, limit)
        return [CacheEntry(str(k), str(s), tuple(str(t).split()), str(c), str(m),
                           tuple(orjson.loads(tr)), float(at))
                for k, s, t, c, m, tr, at in rows]

    async def cache_drop(self, key: str) -> None:
        """Forget a cached plan."""
        await self.database.run("DELETE FROM pf_plan_cache WHERE key = ?", key)

    async def aclose(self) -> None:
        """Close the database."""
        await self.database.aclose()


async def open_planner_store(state_dir: Path, dsn: str | None) -> PlannerStore:
    """The shared PostgreSQL when configured, else SQLite ``planner.db`` under the state dir,
    else (not writable) SQLite in memory."""
    if dsn:
        try:
            return PlannerStore(await PostgresDatabase.connect(dsn))
        except Exception as exc:  # psycopg's errors: the DSN or the server
            raise SystemExit(f"error: planner store (PACKETFLOW_PLANNER_STORE_DSN): {exc}"
                             ) from None

    def sqlite() -> SqliteDatabase:
        state_dir.mkdir(parents=True, exist_ok=True)
        return SqliteDatabase(state_dir / "planner.db")

    try:
        return PlannerStore(await asyncio.to_thread(sqlite))
    except (OSError, sqlite3.Error) as exc:
        log.warning("state dir %s is not usable (%s): the planner learns in memory only",
                    state_dir, exc)
        return PlannerStore(SqliteDatabase(":memory:"))
