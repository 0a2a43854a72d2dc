"""The actor store: one interface over SQLite and PostgreSQL.

Every operation is written once, as a generator that yields ``(sql, params)`` and receives
each statement's ``Result`` (sans I/O). A backend drives it: SQLite synchronously on its
writer thread (batched into group commits), PostgreSQL with psycopg's async connections.
SQL uses ``?`` placeholders; the PostgreSQL backend rewrites them to ``%s``.

Tables carry ``actor_type`` so several types may share one database. State, memory, reminders
and processed message ids are separate tables: memory is an append-only log, reminders are
rows indexed per actor and by due time (never one document for all).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson

from packetflow.actors.errors import FencedOut, ReminderMoved, StoreRefused, StoreUnavailable
from packetflow.errors import PacketFlowError

T = TypeVar("T")


@dataclass(frozen=True)
class Result:
    """What one statement returned: affected rows and fetched rows."""

    rowcount: int
    rows: list[tuple[Any, ...]]


Query = tuple[str, tuple[Any, ...]]
Op = Generator[Query, Result, T]


@dataclass(frozen=True)
class MemoryEntry:
    """One entry of an actor's memory log."""

    seq: int
    at: float
    role: str
    text: str
    data: Any = None

    def to_json(self) -> dict[str, Any]:
        """Plain data for the wire."""
        return {"seq": self.seq, "at": self.at, "role": self.role, "text": self.text,
                "data": self.data}


@dataclass(frozen=True)
class Reminder:
    """A durable reminder of one actor; ``kind`` is ``reminder`` or ``schedule``."""

    name: str
    due_at: float
    period: float | None = None
    data: Any = None
    kind: str = "reminder"

    def to_json(self) -> dict[str, Any]:
        """Plain data for the wire."""
        return {"name": self.name, "dueAt": self.due_at, "period": self.period,
                "data": self.data, "kind": self.kind}


@dataclass(frozen=True)
class DueReminder:
    """A reminder whose time has come, and whose actor it wakes."""

    actor_id: str
    reminder: Reminder

    @property
    def cursor(self) -> DueCursor:
        """Where the page after this reminder starts."""
        return (self.reminder.due_at, self.actor_id, self.reminder.name)


DueCursor = tuple[float, str, str]  # (due_at, actor_id, name): a position in due order


@dataclass(frozen=True)
class Activation:
    """What activation found: the fencing epoch it took and the committed state, if any."""

    epoch: int
    state: dict[str, Any] | None
    version: int
    memory_seq: int


@dataclass(frozen=True)
class ActorRecord:
    """An actor as stored (read-only views: GetActor, ListActors)."""

    actor_id: str
    state: dict[str, Any] | None
    version: int
    epoch: int
    updated_at: float
    memory_count: int = 0


@dataclass
class Commit:
    """Everything one turn changes, written in one transaction, fenced by ``epoch``."""

    actor_id: str
    epoch: int
    state: bytes
    now: float
    memory_seq: int
    appends: Sequence[MemoryEntry] = ()
    max_messages: int = 10_000
    set_reminders: Sequence[Reminder] = ()
    delete_reminders: Sequence[str] = ()
    # The reminder this turn handled: (name, slot it fired for, next slot or None when done).
    fired: tuple[str, float, float | None] | None = None
    message_id: str | None = None
    reply: bytes | None = None


SCHEMA = """
CREATE TABLE IF NOT EXISTS pf_actors (
  actor_type TEXT NOT NULL, actor_id TEXT NOT NULL, state {blob}, version BIGINT NOT NULL,
  epoch BIGINT NOT NULL, owner TEXT, memory_seq BIGINT NOT NULL, updated_at {real} NOT NULL,
  PRIMARY KEY (actor_type, actor_id));
CREATE TABLE IF NOT EXISTS pf_memory (
  actor_type TEXT NOT NULL, actor_id TEXT NOT NULL, seq BIGINT NOT NULL, at {real} NOT NULL,
  role TEXT NOT NULL, text TEXT NOT NULL, data {blob},
  PRIMARY KEY (actor_type, actor_id, seq));
CREATE INDEX IF NOT EXISTS pf_memory_at ON pf_memory (actor_type, at);
CREATE TABLE IF NOT EXISTS pf_reminders (
  actor_type TEXT NOT NULL, actor_id TEXT NOT NULL, name TEXT NOT NULL, due_at {real} NOT NULL,
  period {real}, data {blob}, kind TEXT NOT NULL,
  PRIMARY KEY (actor_type, actor_id, name));
CREATE INDEX IF NOT EXISTS pf_reminders_due ON pf_reminders (actor_type, due_at);
CREATE TABLE IF NOT EXISTS pf_processed (
  actor_type TEXT NOT NULL, actor_id TEXT NOT NULL, message_id TEXT NOT NULL, reply {blob},
  at {real} NOT NULL, PRIMARY KEY (actor_type, actor_id, message_id));
CREATE INDEX IF NOT EXISTS pf_processed_at ON pf_processed (actor_type, at);
CREATE TABLE IF NOT EXISTS pf_members (
  actor_type TEXT NOT NULL, member_id TEXT NOT NULL, address TEXT NOT NULL,
  heartbeat_at {real} NOT NULL, PRIMARY KEY (actor_type, member_id));
"""


def schema_statements(blob: str, real: str) -> list[str]:
    """The DDL with the backend's type names, one statement each."""
    text = SCHEMA.format(blob=blob, real=real)
    return [statement.strip() for statement in text.split(";") if statement.strip()]


def store_error(actor_type: str, exc: Exception,
                refused: tuple[type[Exception], ...] = ()) -> PacketFlowError:
    """Any error of a backend as a domain error: data the store cannot hold (``refused``, or
    a value the JSON encoder rejects) is StoreRefused, everything else StoreUnavailable."""
    if isinstance(exc, PacketFlowError):
        return exc
    if isinstance(exc, (TypeError, ValueError, *refused)):
        return StoreRefused(actor_type, str(exc).strip() or type(exc).__name__)
    return StoreUnavailable(f"actor store of {actor_type}: {exc}".strip())


def _loads(raw: Any) -> Any:
    return None if raw is None else orjson.loads(bytes(raw))


def _dumps(value: Any) -> bytes | None:
    return None if value is None else orjson.dumps(value)


# ------------------------------------------------------------------ operations (sans I/O)

def op_activate(actor_type: str, actor_id: str, owner: str, now: float,
                schedules: Sequence[tuple[str, float]]) -> Op[Activation]:
    """Take the lease: bump the fencing epoch (creating the row), load state, sync schedules."""
    result = yield (
        "INSERT INTO pf_actors (actor_type, actor_id, state, version, epoch, owner, memory_seq,"
        " updated_at) VALUES (?, ?, NULL, 0, 1, ?, 0, ?) ON CONFLICT (actor_type, actor_id) DO"
        " UPDATE SET epoch = pf_actors.epoch + 1, owner = excluded.owner"
        " RETURNING epoch, state, version, memory_seq",
        (actor_type, actor_id, owner, now))
    epoch, state, version, memory_seq = result.rows[0]
    yield from _sync_schedules(actor_type, actor_id, now, schedules)
    return Activation(int(epoch), _loads(state), int(version), int(memory_seq))


def _sync_schedules(actor_type: str, actor_id: str, now: float,
                    schedules: Sequence[tuple[str, float]]) -> Op[None]:
    """Schedules of the manifest become durable reminders; ones no longer declared go away."""
    existing = yield ("SELECT name, period FROM pf_reminders WHERE actor_type = ? AND "
                      "actor_id = ? AND kind = 'schedule'", (actor_type, actor_id))
    have = {name: period for name, period in existing.rows}
    wanted = dict(schedules)
    for name in have.keys() - wanted.keys():
        yield ("DELETE FROM pf_reminders WHERE actor_type = ? AND actor_id = ? AND name = ?",
               (actor_type, actor_id, name))
    for name, period in wanted.items():
        if have.get(name) != period:
            yield ("INSERT INTO pf_reminders (actor_type, actor_id, name, due_at, period, data,"
                   " kind) VALUES (?, ?, ?, ?, ?, NULL, 'schedule') ON CONFLICT (actor_type,"
                   " actor_id, name) DO UPDATE SET due_at = excluded.due_at,"
                   " period = excluded.period, kind = 'schedule'",
                   (actor_type, actor_id, name, now + period, period))


def op_commit(actor_type: str, commit: Commit) -> Op[int]:
    """Write one turn atomically; refuse it (FencedOut) when the epoch is no longer ours."""
    c = commit
    result = yield (
        "UPDATE pf_actors SET state = ?, version = version + 1, memory_seq = ?, updated_at = ?"
        " WHERE actor_type = ? AND actor_id = ? AND epoch = ? RETURNING version",
        (c.state, c.memory_seq, c.now, actor_type, c.actor_id, c.epoch))
    if not result.rows:
        raise FencedOut(actor_type, c.actor_id, c.epoch)
    if c.fired is not None and not (yield from _advance_fired(actor_type, c.actor_id, *c.fired)):
        # Another member already handled this slot (or the reminder changed): the whole turn
        # is refused, so one slot is never applied twice.
        raise ReminderMoved(actor_type, c.actor_id, c.fired[0])
    for entry in c.appends:
        yield ("INSERT INTO pf_memory (actor_type, actor_id, seq, at, role, text, data) VALUES"
               " (?, ?, ?, ?, ?, ?, ?)", (actor_type, c.actor_id, entry.seq, entry.at,
                                          entry.role, entry.text, _dumps(entry.data)))
    if c.appends and c.memory_seq > c.max_messages:
        # Compaction: only the newest max_messages entries are kept.
        yield ("DELETE FROM pf_memory WHERE actor_type = ? AND actor_id = ? AND seq <= ?",
               (actor_type, c.actor_id, c.memory_seq - c.max_messages))
    for name in c.delete_reminders:
        yield ("DELETE FROM pf_reminders WHERE actor_type = ? AND actor_id = ? AND name = ? "
               "AND kind = 'reminder'", (actor_type, c.actor_id, name))
    for reminder in c.set_reminders:
        yield ("INSERT INTO pf_reminders (actor_type, actor_id, name, due_at, period, data, kind)"
               " VALUES (?, ?, ?, ?, ?, ?, 'reminder') ON CONFLICT (actor_type, actor_id, name)"
               " DO UPDATE SET due_at = excluded.due_at, period = excluded.period,"
               " data = excluded.data, kind = 'reminder'",
               (actor_type, c.actor_id, reminder.name, reminder.due_at, reminder.period,
                _dumps(reminder.data)))
    if c.message_id is not None:
        yield ("INSERT INTO pf_processed (actor_type, actor_id, message_id, reply, at) VALUES"
               " (?, ?, ?, ?, ?) ON CONFLICT (actor_type, actor_id, message_id) DO NOTHING",
               (actor_type, c.actor_id, c.message_id, c.reply, c.now))
    return int(result.rows[0][0])


def _advance_fired(actor_type: str, actor_id: str, name: str, slot: float,
                   following: float | None) -> Op[bool]:
    # Conditional on the slot, so a reminder handled twice (two owners) moves on only once;
    # False when the slot was no longer there.
    if following is None:
        result = yield ("DELETE FROM pf_reminders WHERE actor_type = ? AND actor_id = ? AND "
                        "name = ? AND due_at = ?", (actor_type, actor_id, name, slot))
    else:
        result = yield ("UPDATE pf_reminders SET due_at = ? WHERE actor_type = ? AND "
                        "actor_id = ? AND name = ? AND due_at = ?",
                        (following, actor_type, actor_id, name, slot))
    return result.rowcount > 0


def op_advance(actor_type: str, actor_id: str, name: str, slot: float,
               following: float | None) -> Op[bool]:
    """Move a reminder past a slot whose turn failed (no lease needed: conditional on the
    slot); False when it had already moved."""
    return (yield from _advance_fired(actor_type, actor_id, name, slot, following))


def op_processed_reply(actor_type: str, actor_id: str, message_id: str) -> Op[bytes | None]:
    """The stored reply of a message already applied, or None."""
    result = yield ("SELECT reply FROM pf_processed WHERE actor_type = ? AND actor_id = ? AND "
                    "message_id = ?", (actor_type, actor_id, message_id))
    return bytes(result.rows[0][0]) if result.rows else None


def op_get(actor_type: str, actor_id: str) -> Op[ActorRecord | None]:
    """One actor's committed state (no lease, no queueing behind turns)."""
    result = yield ("SELECT state, version, epoch, updated_at FROM pf_actors WHERE actor_type = ?"
                    " AND actor_id = ?", (actor_type, actor_id))
    if not result.rows or int(result.rows[0][1]) == 0:
        return None
    state, version, epoch, updated_at = result.rows[0]
    counted = yield ("SELECT COUNT(*) FROM pf_memory WHERE actor_type = ? AND actor_id = ?",
                     (actor_type, actor_id))
    return ActorRecord(actor_id, _loads(state), int(version), int(epoch), float(updated_at),
                       int(counted.rows[0][0]))


def op_list(actor_type: str, limit: int, after: str) -> Op[list[ActorRecord]]:
    """Actors with committed state, by id, after ``after`` (paging)."""
    result = yield ("SELECT actor_id, version, epoch, updated_at FROM pf_actors WHERE "
                    "actor_type = ? AND actor_id > ? AND version > 0 ORDER BY actor_id LIMIT ?",
                    (actor_type, after, limit))
    return [ActorRecord(str(i), None, int(v), int(e), float(u)) for i, v, e, u in result.rows]


def op_delete(actor_type: str, actor_id: str) -> Op[bool]:
    """Delete an actor's state, memory, reminders and processed ids.

    The row stays as a tombstone with a new epoch, so an owner that still holds the old epoch
    cannot write the actor back to life.
    """
    result = yield ("UPDATE pf_actors SET state = NULL, version = 0, epoch = epoch + 1, "
                    "memory_seq = 0, owner = NULL WHERE actor_type = ? AND actor_id = ? AND "
                    "version > 0", (actor_type, actor_id))
    for table in ("pf_memory", "pf_reminders", "pf_processed"):
        yield (f"DELETE FROM {table} WHERE actor_type = ? AND actor_id = ?",
               (actor_type, actor_id))
    return result.rowcount > 0


def _entries(rows: list[tuple[Any, ...]]) -> list[MemoryEntry]:
    return [MemoryEntry(int(s), float(a), str(r), str(t), _loads(d)) for s, a, r, t, d in rows]


def op_memory_recent(actor_type: str, actor_id: str, limit: int) -> Op[list[MemoryEntry]]:
    """The newest ``limit`` memory entries, oldest first."""
    result = yield ("SELECT seq, at, role, text, data FROM pf_memory WHERE actor_type = ? AND "
                    "actor_id = ? ORDER BY seq DESC LIMIT ?", (actor_type, actor_id, limit))
    return _entries(result.rows)[::-1]


def op_reminders(actor_type: str, actor_id: str) -> Op[list[Reminder]]:
    """An actor's reminders and schedules, by name."""
    result = yield ("SELECT name, due_at, period, data, kind FROM pf_reminders WHERE "
                    "actor_type = ? AND actor_id = ? ORDER BY name", (actor_type, actor_id))
    return [Reminder(str(n), float(d), None if p is None else float(p), _loads(x), str(k))
            for n, d, p, x, k in result.rows]


def op_due(actor_type: str, now: float, limit: int,
           after: DueCursor | None = None) -> Op[list[DueReminder]]:
    """Reminders due at ``now``, earliest first (ties by actor id and name), ``limit`` of them
    after the cursor ``after`` (keyset paging: a backlog is read page by page)."""
    keyset, params = "", [actor_type, now]
    if after is not None:
        keyset = " AND (due_at, actor_id, name) > (?, ?, ?)"
        params.extend(after)
    result = yield ("SELECT actor_id, name, due_at, period, data, kind FROM pf_reminders WHERE "
                    f"actor_type = ? AND due_at <= ?{keyset} ORDER BY due_at, actor_id, name "
                    "LIMIT ?", (*params, limit))
    return [DueReminder(str(i), Reminder(str(n), float(d), None if p is None else float(p),
                                         _loads(x), str(k)))
            for i, n, d, p, x, k in result.rows]


def op_next_due(actor_type: str) -> Op[float | None]:
    """When the earliest reminder is due, or None when there is none."""
    result = yield ("SELECT MIN(due_at) FROM pf_reminders WHERE actor_type = ?", (actor_type,))
    value = result.rows[0][0] if result.rows else None
    return None if value is None else float(value)


def op_sweep(actor_type: str, memory_before: float, processed_before: float) -> Op[int]:
    """Delete memory older than the retention and processed ids older than their window."""
    memory = yield ("DELETE FROM pf_memory WHERE actor_type = ? AND at < ?",
                    (actor_type, memory_before))
    yield ("DELETE FROM pf_processed WHERE actor_type = ? AND at < ?",
           (actor_type, processed_before))
    return memory.rowcount


def op_heartbeat(actor_type: str, member_id: str, address: str, now: float) -> Op[None]:
    """Register or refresh a member of the placement group."""
    yield ("INSERT INTO pf_members (actor_type, member_id, address, heartbeat_at) VALUES "
           "(?, ?, ?, ?) ON CONFLICT (actor_type, member_id) DO UPDATE SET "
           "address = excluded.address, heartbeat_at = excluded.heartbeat_at",
           (actor_type, member_id, address, now))


def op_members(actor_type: str, alive_after: float) -> Op[dict[str, str]]:
    """Members whose last heartbeat is after ``alive_after``: id -> address."""
    result = yield ("SELECT member_id, address FROM pf_members WHERE actor_type = ? AND "
                    "heartbeat_at > ?", (actor_type, alive_after))
    return {str(m): str(a) for m, a in result.rows}


def op_leave(actor_type: str, member_id: str) -> Op[None]:
    """Remove a member (clean shutdown), so the others take its actors at once."""
    yield ("DELETE FROM pf_members WHERE actor_type = ? AND member_id = ?",
           (actor_type, member_id))


# ------------------------------------------------------------------------- the interface

@dataclass
class ActorStore(abc.ABC):
    """The store of one actor type; backends only decide how an ``Op`` meets a database."""

    actor_type: str
    observe: Any = field(default=None, repr=False)  # callable(op name, seconds) or None
    # The DDL the backend runs on open, given its (blob, real) type names. Other durable
    # logs (the federation audit) run their own ops on these backends with their own tables.
    schema: Callable[[str, str], list[str]] = field(default=schema_statements, repr=False)

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and create the tables."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections and threads."""

    @abc.abstractmethod
    async def run(self, name: str, op: Op[T]) -> T:
        """Run one operation in its own transaction (the unit of atomicity)."""

    @property
    def shared(self) -> bool:
        """Whether several processes may use this store (placement needs it)."""
        return False

    async def activate(self, actor_id: str, owner: str, now: float,
                       schedules: Sequence[tuple[str, float]] = ()) -> Activation:
        """Take the actor's lease (new fencing epoch) and load its state."""
        return await self.run("activate", op_activate(self.actor_type, actor_id, owner, now,
                                                      schedules))

    async def commit(self, commit: Commit) -> int:
        """Write a turn; returns the new version or raises FencedOut."""
        return await self.run("commit", op_commit(self.actor_type, commit))

    async def advance(self, actor_id: str,
                      fired: tuple[str, float, float | None]) -> bool:
        """Move a reminder past the slot ``fired`` names; False when it had already moved."""
        return await self.run("advance", op_advance(self.actor_type, actor_id, *fired))

    async def processed_reply(self, actor_id: str, message_id: str) -> bytes | None:
        """The reply already sent for ``message_id``, if that message was applied."""
        return await self.run("processed", op_processed_reply(self.actor_type, actor_id,
                                                              message_id))

    async def get(self, actor_id: str) -> ActorRecord | None:
        """One actor as committed."""
        return await self.run("get", op_get(self.actor_type, actor_id))

    async def list_actors(self, limit: int = 1000, after: str = "") -> list[ActorRecord]:
        """Actors by id (paging with ``after``)."""
        return await self.run("list", op_list(self.actor_type, limit, after))

    async def delete(self, actor_id: str) -> bool:
        """Delete the actor entirely; True when it existed."""
        return await self.run("delete", op_delete(self.actor_type, actor_id))

    async def memory_recent(self, actor_id: str, limit: int) -> list[MemoryEntry]:
        """The newest ``limit`` memory entries, oldest first."""
        return await self.run("memory", op_memory_recent(self.actor_type, actor_id, limit))

    async def reminders(self, actor_id: str) -> list[Reminder]:
        """The actor's reminders and schedules."""
        return await self.run("reminders", op_reminders(self.actor_type, actor_id))

    async def due(self, now: float, limit: int = 256,
                  after: DueCursor | None = None) -> list[DueReminder]:
        """Reminders due now, earliest first, ``limit`` after the cursor ``after``."""
        return await self.run("due", op_due(self.actor_type, now, limit, after))

    async def next_due(self) -> float | None:
        """When the next reminder of this type is due."""
        return await self.run("next_due", op_next_due(self.actor_type))

    async def sweep(self, memory_before: float, processed_before: float) -> int:
        """Retention sweep; returns how many memory entries went."""
        return await self.run("sweep", op_sweep(self.actor_type, memory_before,
                                                processed_before))

    async def heartbeat(self, member_id: str, address: str, now: float) -> None:
        """Register or refresh a placement member."""
        await self.run("heartbeat", op_heartbeat(self.actor_type, member_id, address, now))

    async def members(self, alive_after: float) -> dict[str, str]:
        """Live placement members: id -> address."""
        return await self.run("members", op_members(self.actor_type, alive_after))

    async def leave(self, member_id: str) -> None:
        """Deregister a placement member."""
        await self.run("leave", op_leave(self.actor_type, member_id))
