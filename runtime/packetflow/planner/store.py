"""Where the planner keeps outcomes and cached plans: SQLite under the state dir, or a
PostgreSQL every replica shares (``PACKETFLOW_PLANNER_STORE_DSN``), as the feedback store.

One set of SQL serves both databases (:mod:`packetflow.databases`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import orjson

from packetflow.databases import (
    Database,
    PostgresDatabase,
    SqliteDatabase,
    open_shared_or_local,
)
from packetflow.planner.learning import CacheEntry, Outcome

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


def sqlite_store(path: Path | str) -> PlannerStore:
    """A planner store in the SQLite file ``path`` (tables made if needed)."""
    return PlannerStore(SqliteDatabase(path, SCHEMA, "planner-store"))


async def postgres_store(dsn: str) -> PlannerStore:
    """A planner store in a shared PostgreSQL (tables made if needed)."""
    return PlannerStore(await PostgresDatabase.connect(dsn, SCHEMA))


async def open_planner_store(state_dir: Path, dsn: str | None) -> PlannerStore:
    """The shared PostgreSQL when configured, else SQLite ``planner.db`` under the state dir,
    else (not writable) SQLite in memory."""
    return await open_shared_or_local(
        "planner store", "PACKETFLOW_PLANNER_STORE_DSN", dsn, postgres_store, state_dir,
        lambda directory: sqlite_store(directory / "planner.db"),
        lambda: sqlite_store(":memory:"))
