"""The federation's durable state: the hash-chained audit log (and what it meters), plus
small state the gateway keeps across restarts (trust evidence, peers' catalogs).

Operations are sans-I/O generators, run by the actor stores' backends (SQLite with group
commits on a writer thread, or a shared PostgreSQL): one way to meet a database. Appends are
coalesced in process: concurrent calls' records go down as one batch, one transaction.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from packetflow.actors.store import ActorStore, Op
from packetflow.errors import Unavailable
from packetflow.federation.audit import (
    FIELDS,
    GENESIS,
    Anchor,
    AuditRecord,
    Chained,
    chain,
)
from packetflow.federation.pricing import Usage
from packetflow.spec import AuditPolicy

log = logging.getLogger("packetflow.federation.store")

_COLUMNS = ", ".join(FIELDS)
_SELECT = f"SELECT seq, {_COLUMNS}, prev_hash, hash FROM pf_federation_audit"
# PostgreSQL: replicas sharing one log append one batch at a time, so the chain stays linear.
PG_APPEND_LOCK = "SELECT pg_advisory_xact_lock(7410512)"

SCHEMA = """
CREATE TABLE IF NOT EXISTS pf_federation_audit (
  seq BIGINT PRIMARY KEY, at {real} NOT NULL, direction TEXT NOT NULL, peer TEXT NOT NULL,
  fingerprint TEXT NOT NULL, capability TEXT NOT NULL, decision TEXT NOT NULL,
  reason TEXT NOT NULL, code TEXT NOT NULL, duration_ms {real} NOT NULL,
  bytes_in BIGINT NOT NULL, bytes_out BIGINT NOT NULL, price {real} NOT NULL,
  currency TEXT NOT NULL, trace_id TEXT NOT NULL, input_sha256 TEXT NOT NULL,
  output_sha256 TEXT NOT NULL, address TEXT NOT NULL, notes TEXT NOT NULL,
  prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS pf_federation_audit_at ON pf_federation_audit (at);
CREATE TABLE IF NOT EXISTS pf_federation_anchor (
  id INTEGER PRIMARY KEY, seq BIGINT NOT NULL, hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pf_federation_state (
  key TEXT PRIMARY KEY, value TEXT NOT NULL, updated {real} NOT NULL);
"""


def schema(blob: str, real: str) -> list[str]:
    """The federation tables' DDL with the backend's type names."""
    return [s.strip() for s in SCHEMA.format(real=real).split(";") if s.strip()]


def _row(row: tuple[Any, ...]) -> Chained:
    values = dict(zip(FIELDS, row[1:-2], strict=True))
    return Chained(int(row[0]), AuditRecord(**values), str(row[-2]), str(row[-1]))


# ------------------------------------------------------------------ operations (sans I/O)

def op_anchor() -> Op[Anchor]:
    """Where the stored log starts (after pruning), or the genesis."""
    result = yield ("SELECT seq, hash FROM pf_federation_anchor WHERE id = 1", ())
    if not result.rows:
        return Anchor()
    seq, digest = result.rows[0]
    return Anchor(int(seq), str(digest))


def op_append(records: Sequence[AuditRecord], lock: str | None = None) -> Op[list[Chained]]:
    """Chain ``records`` after the stored head and insert them (one multi-row INSERT)."""
    if lock is not None:
        yield (lock, ())
    result = yield ("SELECT seq, hash FROM pf_federation_audit ORDER BY seq DESC LIMIT 1", ())
    if result.rows:
        last_seq, last_hash = int(result.rows[0][0]), str(result.rows[0][1])
    else:
        anchor = yield from op_anchor()
        last_seq, last_hash = anchor.seq, anchor.hash
    chained = chain(records, last_hash, last_seq + 1)
    marks = "(" + ", ".join("?" * (len(FIELDS) + 3)) + ")"
    params: list[Any] = []
    for item in chained:
        params += [item.seq, *(getattr(item.record, name) for name in FIELDS), item.prev_hash,
                   item.hash]
    yield (f"INSERT INTO pf_federation_audit (seq, {_COLUMNS}, prev_hash, hash) VALUES "
           + ", ".join([marks] * len(chained)), tuple(params))
    return chained


def op_read(*, since: float | None = None, until: float | None = None,
            peer: str | None = None, after_seq: int = 0,
            limit: int | None = None) -> Op[list[Chained]]:
    """Stored records in ``seq`` order, filtered by time, peer and position."""
    where = ["seq > ?"]
    params: list[Any] = [after_seq]
    for clause, value in (("at >= ?", since), ("at < ?", until), ("peer = ?", peer)):
        if value is not None:
            where.append(clause)
            params.append(value)
    sql = f"{_SELECT} WHERE {' AND '.join(where)} ORDER BY seq"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    result = yield (sql, tuple(params))
    return [_row(row) for row in result.rows]


def op_head() -> Op[Chained | None]:
    """The last record, if any."""
    result = yield (f"{_SELECT} ORDER BY seq DESC LIMIT 1", ())
    return _row(result.rows[0]) if result.rows else None


def op_prune(before: float) -> Op[int]:
    """Drop the records before ``before`` (retention); the last dropped becomes the anchor."""
    result = yield ("SELECT seq, hash FROM pf_federation_audit WHERE seq = (SELECT MAX(seq) "
                    "FROM pf_federation_audit WHERE at < ?)", (before,))
    if not result.rows:
        return 0
    seq, digest = result.rows[0]
    deleted = yield ("DELETE FROM pf_federation_audit WHERE seq <= ?", (seq,))
    yield ("INSERT INTO pf_federation_anchor (id, seq, hash) VALUES (1, ?, ?) ON CONFLICT (id) "
           "DO UPDATE SET seq = excluded.seq, hash = excluded.hash", (seq, digest))
    return deleted.rowcount


def op_usage(since: float, until: float, peer: str | None = None) -> Op[list[Usage]]:
    """Calls per (direction, peer, capability, currency) over [since, until)."""
    sql = ("SELECT direction, peer, capability, currency, "
           "SUM(CASE WHEN decision = 'allow' THEN 1 ELSE 0 END), "
           "SUM(CASE WHEN decision = 'allow' AND code = 'OK' THEN 1 ELSE 0 END), "
           "SUM(CASE WHEN decision = 'allow' AND code <> 'OK' THEN 1 ELSE 0 END), "
           "SUM(CASE WHEN decision = 'deny' THEN 1 ELSE 0 END), SUM(price) "
           "FROM pf_federation_audit WHERE at >= ? AND at < ? AND capability <> ''")
    params: list[Any] = [since, until]
    if peer is not None:
        sql += " AND peer = ?"
        params.append(peer)
    sql += " GROUP BY direction, peer, capability, currency ORDER BY direction, peer, capability"
    result = yield (sql, tuple(params))
    return [Usage(str(d), str(p), str(c), int(calls), int(ok), int(errors), int(denied),
                  float(metered or 0.0), str(currency))
            for d, p, c, currency, calls, ok, errors, denied, metered in result.rows]


def op_put_state(key: str, value: Any, now: float) -> Op[None]:
    """Keep a small JSON value under ``key``."""
    yield ("INSERT INTO pf_federation_state (key, value, updated) VALUES (?, ?, ?) ON CONFLICT "
           "(key) DO UPDATE SET value = excluded.value, updated = excluded.updated",
           (key, orjson.dumps(value).decode(), now))


def op_get_state(key: str) -> Op[Any]:
    """The value kept under ``key``, or ``None``."""
    result = yield ("SELECT value FROM pf_federation_state WHERE key = ?", (key,))
    return orjson.loads(result.rows[0][0]) if result.rows else None


# ------------------------------------------------------------------------------ the store

class AuditUnavailable(Unavailable):
    """The audit log cannot be written: calls are refused rather than left unaudited."""


class FederationStore:
    """The audit log and state over one backend (see the module docstring)."""

    def __init__(self, backend: ActorStore, lock: str | None = None,
                 write_now: Callable[[str, Op[list[Chained]]], list[Chained]] | None = None
                 ) -> None:
        self.backend = backend
        self.lock = lock
        # A backend that writes on the loop's thread (SQLite inline): each batch goes down
        # from a callback at the end of the loop turn that queued it, no task in between.
        self.write_now = write_now
        self._scheduled = False
        self.head: Chained | None = None
        self.appended = 0
        self.failing: str | None = None  # why the last append failed, until one succeeds
        self._pending: list[tuple[AuditRecord, asyncio.Future[Chained]]] = []
        self._flusher: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, policy: AuditPolicy, state_dir: Path,
                   dsn: str | None = None) -> FederationStore:
        """Open the store ``policy`` names: PostgreSQL (``dsn`` resolved by the caller) or
        SQLite (its path, default ``<state_dir>/federation.db``)."""
        # Imported here: only the backend in use loads its driver.
        if policy.store.postgresql is not None:
            from packetflow.actors.postgres_store import PostgresActorStore

            backend: ActorStore = PostgresActorStore("federation", dsn=dsn or "",
                                                     connections=2, schema=schema)
            lock: str | None = PG_APPEND_LOCK
        else:
            from packetflow.actors.sqlite_store import SqliteActorStore

            sqlite = policy.store.sqlite
            path = Path(sqlite.path) if sqlite is not None and sqlite.path else \
                state_dir / "federation.db"
            # NORMAL in WAL mode: a commit survives the process dying (not the machine
            # losing power) without an fsync per batch; PostgreSQL is the durable, shared log.
            sqlite_backend = SqliteActorStore("federation", path=path, schema=schema,
                                              synchronous="NORMAL", inline=True)
            await sqlite_backend.open()
            store = cls(sqlite_backend, None, sqlite_backend.run_inline)
            store.head = await sqlite_backend.run("head", op_head())
            return store
        await backend.open()
        store = cls(backend, lock)
        store.head = await backend.run("head", op_head())
        return store

    async def append(self, record: AuditRecord) -> Chained:
        """Append one record (batched with concurrent appends); :class:`AuditUnavailable`
        when the log cannot be written."""
        future: asyncio.Future[Chained] = asyncio.get_running_loop().create_future()
        self._pending.append((record, future))
        if self.write_now is not None:
            if not self._scheduled:
                self._scheduled = True
                # Written two loop turns on: the records of calls answered in the next turn
                # join this batch (one commit costs about four records' worth of writing).
                loop = asyncio.get_running_loop()
                loop.call_soon(loop.call_soon, self._write_pending)
        elif self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        # A cancelled caller cancels only its wait: the record stays queued and is written.
        return await future

    def _write_pending(self) -> None:
        """Write what is queued now, on this thread (``write_now``)."""
        assert self.write_now is not None
        self._scheduled = False
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            chained = self.write_now("append", op_append([record for record, _ in batch],
                                                         self.lock))
        except Exception as exc:  # any backend failure: nothing was written
            self._failed(batch, exc)
            return
        self._written(batch, chained)

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    chained = await self.backend.run(
                        "append", op_append([record for record, _ in batch], self.lock))
                except Exception as exc:  # any backend failure: nothing was written
                    self._failed(batch, exc)
                    continue
                self._written(batch, chained)
        finally:
            self._flusher = None

    def _failed(self, batch: list[tuple[AuditRecord, asyncio.Future[Chained]]],
                exc: Exception) -> None:
        log.error("audit log append failed: %s", exc)
        self.failing = f"the audit log cannot be written: {exc}"
        for _, future in batch:
            if not future.done():
                future.set_exception(AuditUnavailable(self.failing))

    def _written(self, batch: list[tuple[AuditRecord, asyncio.Future[Chained]]],
                 chained: list[Chained]) -> None:
        self.head = chained[-1]
        self.appended += len(chained)
        self.failing = None
        for (_, future), item in zip(batch, chained, strict=True):
            if not future.done():
                future.set_result(item)

    async def read(self, **filters: Any) -> list[Chained]:
        """Stored records (see :func:`op_read` for the filters)."""
        return await self.backend.run("read", op_read(**filters))

    async def anchor(self) -> Anchor:
        """Where the stored log starts."""
        return await self.backend.run("anchor", op_anchor())

    async def prune(self, before: float) -> int:
        """Drop records older than ``before``; how many went."""
        return await self.backend.run("prune", op_prune(before))

    async def usage(self, since: float, until: float, peer: str | None = None) -> list[Usage]:
        """Metered usage over a period."""
        return await self.backend.run("usage", op_usage(since, until, peer))

    async def put_state(self, key: str, value: Any) -> None:
        """Keep a JSON value."""
        await self.backend.run("put-state", op_put_state(key, value, time.time()))

    async def get_state(self, key: str) -> Any:
        """A kept JSON value, or ``None``."""
        return await self.backend.run("get-state", op_get_state(key))

    async def aclose(self) -> None:
        """Write what is pending, then close."""
        if self.write_now is not None:
            self._write_pending()
        while self._flusher is not None:
            await self._flusher
        await self.backend.close()


__all__ = ["GENESIS", "AuditUnavailable", "FederationStore"]
