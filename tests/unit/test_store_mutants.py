"""Actor store details the broader store tests leave open, on a real SQLite file."""

from __future__ import annotations

import sqlite3

from packetflow.actors.sqlite_store import SqliteActorStore
from packetflow.actors.store import Commit, MemoryEntry, Reminder
from tests.unit import test_actors_store

store = test_actors_store.store  # the same fixture: a store of type ``t`` on a SQLite file


def notes(first: int, last: int) -> list[MemoryEntry]:
    return [MemoryEntry(seq, 1.0, "note", f"n{seq}", None) for seq in range(first, last + 1)]


async def test_memory_is_compacted_only_by_a_turn_that_writes_memory(
        store: SqliteActorStore) -> None:
    await store.activate("a", "m1", 0.0)
    await store.commit(Commit("a", 1, b"{}", 1.0, 4, notes(1, 4), max_messages=10))
    # A turn that appends nothing leaves memory alone, even under a lower limit.
    await store.commit(Commit("a", 1, b"{}", 2.0, 4, (), max_messages=2))
    assert [e.seq for e in await store.memory_recent("a", 10)] == [1, 2, 3, 4]
    # Exactly at the limit nothing goes; one past it, the oldest goes.
    await store.commit(Commit("a", 1, b"{}", 3.0, 5, notes(5, 5), max_messages=5))
    assert [e.seq for e in await store.memory_recent("a", 10)] == [1, 2, 3, 4, 5]
    await store.commit(Commit("a", 1, b"{}", 4.0, 6, notes(6, 6), max_messages=5))
    assert [e.seq for e in await store.memory_recent("a", 10)] == [2, 3, 4, 5, 6]


async def test_the_lease_holder_is_recorded_and_cleared_on_delete(
        store: SqliteActorStore) -> None:
    await store.activate("a", "member-1", 0.0)
    await store.commit(Commit("a", 1, b"{}", 1.0, 0))
    await store.activate("a", "member-2", 2.0)

    def owner() -> str | None:
        with sqlite3.connect(store.path) as db:
            (row,) = db.execute("SELECT owner FROM pf_actors WHERE actor_id = 'a'").fetchall()
        return row[0]  # type: ignore[no-any-return]

    assert owner() == "member-2"
    assert await store.delete("a")
    assert owner() is None


async def test_default_pages_hold_1000_actors_and_256_due_reminders(
        store: SqliteActorStore) -> None:
    for index in range(1001):
        actor = f"a{index:04d}"
        await store.activate(actor, "m1", 0.0)
        await store.commit(Commit(actor, 1, b"{}", 1.0, 0))
    listed = await store.list_actors()
    assert len(listed) == 1000 and listed[-1].actor_id == "a0999"
    await store.commit(Commit("a0000", 1, b"{}", 2.0, 0, set_reminders=[
        Reminder(f"r{index:03d}", 5.0, None, None, "reminder") for index in range(257)]))
    due = await store.due(10.0)
    assert len(due) == 256 and due[-1].reminder.name == "r255"


async def test_due_reminders_are_read_page_by_page_after_a_cursor(
        store: SqliteActorStore) -> None:
    # Ties on due_at are ordered by actor id, then name: a cursor is an exact position.
    for actor, names in (("b", ["x"]), ("a", ["y", "x"])):
        await store.activate(actor, "m1", 0.0)
        await store.commit(Commit(actor, 1, b"{}", 1.0, 0, set_reminders=[
            Reminder(name, 5.0) for name in names]))
    first = await store.due(10.0, limit=2)
    assert [(d.actor_id, d.reminder.name) for d in first] == [("a", "x"), ("a", "y")]
    rest = await store.due(10.0, limit=2, after=first[-1].cursor)
    assert [(d.actor_id, d.reminder.name) for d in rest] == [("b", "x")]
    assert await store.due(10.0, after=rest[-1].cursor) == []
