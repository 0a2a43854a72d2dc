"""The actor store's operations, one by one with exact results, on a real SQLite file (the
same operations run on PostgreSQL; test_actors_runtime.py runs the actor runtime on both)."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from packetflow.actors.errors import FencedOut, ReminderMoved, StoreRefused, StoreUnavailable
from packetflow.actors.sqlite_store import SqliteActorStore
from packetflow.actors.store import (
    Activation,
    ActorRecord,
    Commit,
    DueReminder,
    MemoryEntry,
    Reminder,
    schema_statements,
    store_error,
)
from packetflow.errors import InvalidInput


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteActorStore]:
    """A store of type ``t`` and, in the same file, one of type ``other``."""
    opened = SqliteActorStore("t", path=tmp_path / "actors.db", synchronous="NORMAL")
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def other(store: SqliteActorStore) -> AsyncIterator[SqliteActorStore]:
    opened = SqliteActorStore("other", path=store.path, synchronous="NORMAL")
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


def note(seq: int, at: float, text: str, data: object = None) -> MemoryEntry:
    return MemoryEntry(seq, at, "note", text, data)


async def test_activation_takes_a_new_epoch_and_loads_what_was_committed(
        store: SqliteActorStore) -> None:
    assert await store.activate("a", "m1", 10.0) == Activation(1, None, 0, 0)
    assert await store.get("a") is None  # activated, nothing committed: not an actor yet
    assert await store.commit(Commit("a", 1, b'{"n": 1}', 11.0, 2,
                                     [note(1, 11.0, "x"), note(2, 11.0, "y")])) == 1
    assert await store.activate("a", "m2", 12.0) == Activation(2, {"n": 1}, 1, 2)
    assert await store.get("a") == ActorRecord("a", {"n": 1}, 1, 2, 11.0, 2)
    with pytest.raises(FencedOut, match=r"^actor t/a: write refused, epoch 1 is stale"):
        await store.commit(Commit("a", 1, b"{}", 13.0, 2))
    assert await store.commit(Commit("a", 2, b'{"n": 2}', 13.0, 2)) == 2
    assert (await store.get("a")) == ActorRecord("a", {"n": 2}, 2, 2, 13.0, 2)


async def test_schedules_become_reminders_and_follow_the_manifest(
        store: SqliteActorStore) -> None:
    await store.activate("a", "m", 100.0, [("hourly", 3600.0), ("daily", 86400.0)])
    assert await store.reminders("a") == [
        Reminder("daily", 86500.0, 86400.0, None, "schedule"),
        Reminder("hourly", 3700.0, 3600.0, None, "schedule")]
    # Unchanged ones keep their slot; a changed period restarts; dropped ones go.
    await store.activate("a", "m", 200.0, [("hourly", 3600.0), ("weekly", 604800.0)])
    assert await store.reminders("a") == [
        Reminder("hourly", 3700.0, 3600.0, None, "schedule"),
        Reminder("weekly", 605000.0, 604800.0, None, "schedule")]
    await store.activate("a", "m", 300.0, [("hourly", 60.0)])
    assert await store.reminders("a") == [Reminder("hourly", 360.0, 60.0, None, "schedule")]


async def test_a_commit_writes_memory_reminders_and_the_reply_together(
        store: SqliteActorStore) -> None:
    await store.activate("a", "m", 0.0)
    await store.commit(Commit(
        "a", 1, b"{}", 5.0, 3, [note(1, 5.0, "one", {"k": [1]}), note(2, 5.0, "two"),
                                note(3, 5.0, "three")], max_messages=10,
        set_reminders=[Reminder("ping", 60.0, 30.0, {"d": 1}), Reminder("once", 90.0)],
        message_id="m-1", reply=b'{"ok": true}'))
    assert await store.memory_recent("a", 2) == [note(2, 5.0, "two"), note(3, 5.0, "three")]
    assert (await store.memory_recent("a", 10))[0] == note(1, 5.0, "one", {"k": [1]})
    assert await store.reminders("a") == [Reminder("once", 90.0, None, None, "reminder"),
                                          Reminder("ping", 60.0, 30.0, {"d": 1}, "reminder")]
    assert await store.processed_reply("a", "m-1") == b'{"ok": true}'
    assert await store.processed_reply("a", "m-2") is None
    # Compaction keeps the newest max_messages; a cancelled reminder goes; a retried message
    # id keeps its first reply.
    await store.commit(Commit("a", 1, b"{}", 6.0, 5, [note(4, 6.0, "four"), note(5, 6.0, "five")],
                              max_messages=2, delete_reminders=["once"], message_id="m-1",
                              reply=b'{"ok": false}'))
    assert [e.text for e in await store.memory_recent("a", 10)] == ["four", "five"]
    assert [r.name for r in await store.reminders("a")] == ["ping"]
    assert await store.processed_reply("a", "m-1") == b'{"ok": true}'
    assert (await store.get("a")) == ActorRecord("a", {}, 2, 1, 6.0, 2)


async def test_schedules_are_not_cancelled_as_reminders(store: SqliteActorStore) -> None:
    await store.activate("a", "m", 0.0, [("tick", 10.0)])
    await store.commit(Commit("a", 1, b"{}", 1.0, 0, delete_reminders=["tick"]))
    assert [r.kind for r in await store.reminders("a")] == ["schedule"]
    # ...but setting a reminder of that name takes the slot over.
    await store.commit(Commit("a", 1, b"{}", 2.0, 0,
                              set_reminders=[Reminder("tick", 50.0, None, {"x": 1})]))
    assert await store.reminders("a") == [Reminder("tick", 50.0, None, {"x": 1}, "reminder")]


async def test_due_reminders_fire_once_per_slot(store: SqliteActorStore,
                                                other: SqliteActorStore) -> None:
    await store.activate("a", "m", 0.0)
    await store.activate("b", "m", 0.0)
    await other.activate("c", "m", 0.0)
    await store.commit(Commit("a", 1, b"{}", 0.0, 0, set_reminders=[
        Reminder("every", 10.0, 10.0), Reminder("later", 30.0)]))
    await store.commit(Commit("b", 1, b"{}", 0.0, 0, set_reminders=[Reminder("soon", 5.0)]))
    await other.activate("s", "m", 0.0, [("nightly", 3.0)])  # a schedule, due at 3.0
    await other.commit(Commit("c", 1, b"{}", 0.0, 0, set_reminders=[
        Reminder("x", 1.0, None, {"payload": [1]})]))
    assert await other.due(5.0) == [DueReminder("c", Reminder("x", 1.0, None, {"payload": [1]})),
                                    DueReminder("s", Reminder("nightly", 3.0, 3.0, None,
                                                              "schedule"))]
    assert await store.next_due() == 5.0 and await other.next_due() == 1.0
    assert await store.due(4.0) == []
    assert await store.due(10.0) == [DueReminder("b", Reminder("soon", 5.0)),
                                     DueReminder("a", Reminder("every", 10.0, 10.0))]
    assert await store.due(10.0, limit=1) == [DueReminder("b", Reminder("soon", 5.0))]
    # A turn that handled a slot moves it on (periodic) or removes it (one-shot), once.
    await store.commit(Commit("a", 1, b"{}", 10.0, 0, fired=("every", 10.0, 20.0)))
    with pytest.raises(ReminderMoved, match=r"^actor t/a: reminder 'every' was already"):
        await store.commit(Commit("a", 1, b'{"twice": true}', 10.0, 0,
                                  fired=("every", 10.0, 20.0)))
    refused = await store.get("a")
    assert refused is not None and refused.state == {}  # the second write did not land
    await store.commit(Commit("b", 1, b"{}", 10.0, 0, fired=("soon", 5.0, None)))
    assert await store.due(25.0) == [DueReminder("a", Reminder("every", 20.0, 10.0))]
    # A failed turn's slot is moved straight in the store, also once.
    assert await store.advance("a", ("every", 20.0, 30.0))
    assert not await store.advance("a", ("every", 20.0, 30.0))
    assert await store.advance("a", ("later", 30.0, None))
    assert await store.reminders("a") == [Reminder("every", 30.0, 10.0)]
    await store.delete("a")
    await store.delete("b")
    assert await store.next_due() is None


async def test_list_pages_by_id_and_skips_uncommitted(store: SqliteActorStore,
                                                      other: SqliteActorStore) -> None:
    for actor_id in ("c", "a", "b", "d", "A1"):
        await store.activate(actor_id, "m", 0.0)
        if actor_id != "d":
            await store.commit(Commit(actor_id, 1, b"{}", 7.0, 0))
    await other.activate("z", "m", 0.0)
    await other.commit(Commit("z", 1, b"{}", 7.0, 0))
    assert await store.list_actors() == [ActorRecord(i, None, 1, 1, 7.0)
                                         for i in ("A1", "a", "b", "c")]
    assert [r.actor_id for r in await store.list_actors(limit=2)] == ["A1", "a"]
    assert [r.actor_id for r in await store.list_actors(after="b")] == ["c"]


async def test_delete_leaves_a_fenced_tombstone(store: SqliteActorStore,
                                                other: SqliteActorStore) -> None:
    await store.activate("a", "m", 0.0)
    await store.commit(Commit("a", 1, b'{"n": 1}', 1.0, 1, [note(1, 1.0, "x")],
                              set_reminders=[Reminder("r", 5.0)], message_id="id",
                              reply=b"{}"))
    await other.activate("a", "m", 0.0)
    await other.commit(Commit("a", 1, b'{"n": 9}', 1.0, 0))
    assert await store.delete("a")
    assert not await store.delete("a")
    assert await store.get("a") is None and await store.list_actors() == []
    assert await store.memory_recent("a", 5) == [] and await store.reminders("a") == []
    assert await store.processed_reply("a", "id") is None
    with pytest.raises(FencedOut):  # the old owner cannot write it back to life
        await store.commit(Commit("a", 1, b'{"n": 2}', 2.0, 0))
    assert await store.activate("a", "m", 3.0) == Activation(3, None, 0, 0)
    assert (await other.get("a")) == ActorRecord("a", {"n": 9}, 1, 1, 1.0, 0)  # another type


async def test_sweep_deletes_old_memory_and_old_message_ids(store: SqliteActorStore) -> None:
    await store.activate("a", "m", 0.0)
    await store.commit(Commit("a", 1, b"{}", 10.0, 2, [note(1, 10.0, "old"),
                                                       note(2, 20.0, "new")],
                              message_id="old-id", reply=b"1"))
    await store.commit(Commit("a", 1, b"{}", 20.0, 2, message_id="new-id", reply=b"2"))
    assert await store.sweep(memory_before=20.0, processed_before=15.0) == 1
    assert [e.text for e in await store.memory_recent("a", 5)] == ["new"]
    assert await store.processed_reply("a", "old-id") is None
    assert await store.processed_reply("a", "new-id") == b"2"
    assert await store.sweep(memory_before=20.0, processed_before=15.0) == 0


async def test_members_come_refresh_and_leave(store: SqliteActorStore,
                                              other: SqliteActorStore) -> None:
    await store.heartbeat("m1", "h1:1", 10.0)
    await store.heartbeat("m2", "h2:1", 10.0)
    await other.heartbeat("m3", "h3:1", 10.0)
    assert await store.members(9.0) == {"m1": "h1:1", "m2": "h2:1"}
    assert await store.members(10.0) == {}
    await store.heartbeat("m1", "moved:2", 20.0)
    assert await store.members(15.0) == {"m1": "moved:2"}
    await store.leave("m1")
    assert await store.members(0.0) == {"m2": "h2:1"}
    assert await other.members(0.0) == {"m3": "h3:1"}


def test_schema_and_errors() -> None:
    statements = schema_statements("BYTEA", "DOUBLE PRECISION")
    assert len(statements) == 8 and all(s and not s.endswith(";") for s in statements)
    assert "state BYTEA" in statements[0] and "updated_at DOUBLE PRECISION" in statements[0]
    refused = store_error("t", ValueError("bad value "))
    assert isinstance(refused, StoreRefused)
    assert refused.message == "actor store of t refused the write: bad value"
    unnamed = store_error("t", TypeError())
    assert unnamed.message == "actor store of t refused the write: TypeError"
    assert isinstance(store_error("t", sqlite3.IntegrityError("dup"),
                                  (sqlite3.IntegrityError,)), StoreRefused)
    down = store_error("t", OSError("disk gone"))
    assert isinstance(down, StoreUnavailable)
    assert down.message == "actor store of t: disk gone"
    domain = InvalidInput([])
    assert store_error("t", domain) is domain
    assert MemoryEntry(1, 2.0, "user", "hi", {"a": 1}).to_json() == {
        "seq": 1, "at": 2.0, "role": "user", "text": "hi", "data": {"a": 1}}
    assert Reminder("r", 1.0, 2.0, [1], "schedule").to_json() == {
        "name": "r", "dueAt": 1.0, "period": 2.0, "data": [1], "kind": "schedule"}


async def test_every_operation_is_timed_under_its_own_name(store: SqliteActorStore) -> None:
    timed: list[str] = []
    store.observe = lambda name, seconds: timed.append(name)
    await store.activate("a", "m", 0.0)
    await store.commit(Commit("a", 1, b"{}", 0.0, 0, set_reminders=[Reminder("r", 1.0)]))
    await store.advance("a", ("r", 1.0, None))
    await store.processed_reply("a", "id")
    await store.get("a")
    await store.list_actors()
    await store.memory_recent("a", 1)
    await store.reminders("a")
    await store.due(0.0)
    await store.next_due()
    await store.sweep(0.0, 0.0)
    await store.heartbeat("m", "h:1", 0.0)
    await store.members(0.0)
    await store.leave("m")
    await store.delete("a")
    # The names label packetflow_actor_store_duration_seconds{operation}.
    assert timed == ["activate", "commit", "advance", "processed", "get", "list", "memory",
                     "reminders", "due", "next_due", "sweep", "heartbeat", "members", "leave",
                     "delete"]
