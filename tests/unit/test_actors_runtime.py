"""The actor runtime in process, on real stores (SQLite files, a real PostgreSQL server)."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

import pytest

from packetflow.actors import ActorSystem
from packetflow.actors.active import ActiveActor
from packetflow.actors.errors import ActorNotFound, ActorTypeNotFound, FencedOut
from packetflow.actors.store import Commit
from packetflow.engine import Engine
from packetflow.errors import DeadlineExceeded, InvalidInput
from packetflow.manifests import load_text
from packetflow.spec import Actor
from tests.conftest import eventually
from tests.support import actor_handlers
from tests.support.actors import FakeClock, SystemFactory, handler_actor
from tests.support.manifests import sample_capabilities

pytest_plugins = ["tests.support.postgres"]


def ledger(name: str = "ledger", **spec: Any) -> Actor:
    """An Actor manifest for ``tests.support.actor_handlers.Ledger`` with ``spec`` overrides."""
    return handler_actor(name, "Ledger", "Record numbers", **spec)


async def started(system: ActorSystem, *actors: Actor) -> ActorSystem:
    errors = await system.replace(actors)
    assert not errors, errors
    return system


async def test_turns_run_one_at_a_time_in_arrival_order(systems: SystemFactory) -> None:
    system = await started(systems(), ledger())
    kind = system.get("ledger")
    replies = await asyncio.gather(*(kind.send("a", {"n": n}) for n in range(100)))
    assert [r.reply["count"] for r in replies] == list(range(1, 101))
    assert (await kind.describe("a"))["state"]["applied"] == list(range(100))
    assert replies[-1].version == 100


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_state_survives_a_restart(systems: SystemFactory, backend: str,
                                        request: pytest.FixtureRequest) -> None:
    store = ({"postgresql": {"dsn": request.getfixturevalue("postgres_dsn")}}
             if backend == "postgresql" else {"sqlite": {}})
    first = await started(systems(), ledger(store=store))
    for n in range(3):
        await first.get("ledger").send("a", {"n": n, "note": f"note {n}"})
    await first.aclose()
    second = await started(systems(), ledger(store=store))
    reply = await second.get("ledger").send("a", {"n": 3})
    assert reply.reply == {"n": 3, "count": 4}
    described = await second.get("ledger").describe("a")
    assert described["state"]["applied"] == [0, 1, 2, 3]
    assert described["memory"]["count"] == 3
    assert [r.actor_id for r in await second.get("ledger").list_actors()] == ["a"]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_fencing_refuses_a_stale_owner(systems: SystemFactory, backend: str,
                                             request: pytest.FixtureRequest,
                                             tmp_path: Path) -> None:
    store = ({"postgresql": {"dsn": request.getfixturevalue("postgres_dsn")}}
             if backend == "postgresql" else {"sqlite": {"path": str(tmp_path / "shared.db")}})
    old = await started(systems(member_id="old"), ledger(store=store))
    new = await started(systems(member_id="new"), ledger(store=store))
    await old.get("ledger").send("a", {"n": 1})
    # The actor moves: the new owner's activation takes a higher epoch.
    await new.get("ledger").send("a", {"n": 2})
    stale = old.get("ledger").active["a"]
    # The stale owner's write (computed from [1]) is refused; the message is applied once, on
    # a fresh activation that sees the new owner's state.
    assert (await old.get("ledger").send("a", {"n": 99})).reply["count"] == 3
    assert stale.retired and old.get("ledger").active["a"] is not stale
    assert (await new.get("ledger").describe("a"))["state"]["applied"] == [1, 2, 99]
    # Now the other one is stale: the store refuses its write outright.
    with pytest.raises(FencedOut, match="stale"):
        await new.get("ledger").store.commit(Commit(
            "a", new.get("ledger").active["a"].epoch, b"{}", 0.0, 0))
    await new.get("ledger").send("a", {"n": 3})
    assert (await new.get("ledger").describe("a"))["state"]["applied"] == [1, 2, 99, 3]


async def test_a_retried_message_id_is_applied_once(systems: SystemFactory) -> None:
    kind = (await started(systems(), ledger())).get("ledger")
    first = await kind.send("a", {"n": 7}, message_id="m-7")
    again = await kind.send("a", {"n": 7}, message_id="m-7")
    assert again.duplicate and again.reply == first.reply
    assert (await kind.describe("a"))["state"]["applied"] == [7]


async def test_processed_message_ids_are_swept_after_24_hours(systems: SystemFactory) -> None:
    clock = FakeClock()
    kind = (await started(systems(clock=clock), ledger())).get("ledger")
    await kind.send("a", {"n": 1}, message_id="m-1")
    clock.now += 24 * 3600 - 60  # not yet a day: the sweep keeps the id
    await kind.sweep()
    assert (await kind.send("a", {"n": 1}, message_id="m-1")).duplicate
    clock.now += 120  # over a day: swept, so the same id is a new message
    await kind.sweep()
    again = await kind.send("a", {"n": 1}, message_id="m-1")
    assert not again.duplicate and again.reply["count"] == 2
    assert (await kind.describe("a"))["state"]["applied"] == [1, 1]


async def test_active_bound_and_idle_timeout_keep_memory_flat(systems: SystemFactory) -> None:
    kind = (await started(systems(), ledger(maxActive=50, idleTimeout="200ms"))).get("ledger")
    for start in range(0, 1000, 100):
        await asyncio.gather(*(kind.send(f"id-{i}", {"n": i})
                               for i in range(start, start + 100)))
        assert len(kind.active) <= 50
    gc.collect()
    # type() rather than isinstance(): isinstance reads __class__, which some objects of
    # other libraries in this process (torch's deprecated aliases) answer with a warning.
    live = sum(type(o) is ActiveActor for o in gc.get_objects())
    assert live <= 50 + 5
    await eventually(lambda: not kind.active, what="idle actors to deactivate")
    # Passivated, not lost: state comes back on the next message.
    assert (await kind.send("id-3", {"n": 1000})).reply["count"] == 2


async def test_reminder_fires_once_for_the_missed_period_after_restart(
        systems: SystemFactory) -> None:
    clock = FakeClock()
    first = await started(systems(clock=clock), ledger())
    await first.get("ledger").send("a", {"n": 0, "remind_every": "1m"})
    await first.aclose()
    clock.now += 10 * 60 + 1  # ten periods pass while nothing runs
    second = await started(systems(clock=clock), ledger())
    kind = second.get("ledger")

    async def ticks() -> int:
        try:
            return int((await kind.describe("a"))["state"].get("ticks", 0))
        except ActorNotFound:
            return 0

    await eventually(lambda: _at_least(ticks(), 1), what="the missed reminder")
    assert await kind.reminders.fire_due() == 0  # not a backlog: the next slot is in the future
    assert await ticks() == 1
    reminder = (await kind.describe("a"))["reminders"][0]
    assert reminder["name"] == "tick" and clock.now < reminder["dueAt"] <= clock.now + 60
    clock.now += 60
    await eventually(lambda: _at_least(ticks(), 2), what="the next reminder")
    assert await ticks() == 2


async def _at_least(value: Any, minimum: int) -> bool:
    return bool(await value >= minimum)


async def test_retention_sweep_deletes_old_memory(systems: SystemFactory) -> None:
    clock = FakeClock()
    kind = (await started(systems(clock=clock), ledger(memory={"retention": "1d"}))
            ).get("ledger")
    await kind.send("a", {"n": 0, "note": "old"})
    clock.now += 2 * 86400
    await kind.send("a", {"n": 1, "note": "new"})
    assert await kind.sweep() == 1
    memory = (await kind.describe("a"))["memory"]
    assert [entry["text"] for entry in memory["recent"]] == ["new"]


async def test_compaction_keeps_the_newest_max_messages(systems: SystemFactory) -> None:
    kind = (await started(systems(), ledger(memory={"maxMessages": 3}))).get("ledger")
    for n in range(6):
        await kind.send("a", {"n": n, "note": f"entry {n}"})
    memory = (await kind.describe("a"))["memory"]
    assert memory["count"] == 3
    assert [e["text"] for e in memory["recent"]] == ["entry 3", "entry 4", "entry 5"]


async def test_memory_search_ranks_with_bm25(systems: SystemFactory) -> None:
    # semanticSearch off: BM25 whether or not the embeddings extra is installed.
    kind = (await started(systems(), ledger(memory={"semanticSearch": False}))).get("ledger")
    assert kind.ranker.name == "bm25"
    for n, note in enumerate(["invoice overdue", "router broken again", "router reset"]):
        await kind.send("a", {"n": n, "note": note})
    reply = await kind.send("a", {"n": 9, "search": "broken router"})
    assert reply.reply["found"] == ["router broken again", "router reset"]


async def test_reads_do_not_queue_behind_a_running_turn(systems: SystemFactory) -> None:
    kind = (await started(systems(), ledger())).get("ledger")
    await kind.send("a", {"n": 1})
    actor_handlers.GATES["slow"] = asyncio.Event()
    slow = asyncio.create_task(kind.send("a", {"n": 2, "gate": "slow"}))
    await eventually(lambda: kind.active["a"].lock.locked(), what="the slow turn")
    # GetActor answers from the store while the turn runs: the turn is held until the read
    # returned, so a read that waited for the turn would never return (a generous bound).
    described = await asyncio.wait_for(kind.describe("a"), 30)
    assert described["state"]["applied"] == [1] and not slow.done()
    assert [r.actor_id for r in await asyncio.wait_for(kind.list_actors(), 30)] == ["a"]
    actor_handlers.GATES["slow"].set()
    assert (await slow).reply["count"] == 2
    assert (await kind.describe("a"))["state"]["applied"] == [1, 2]


async def test_a_turn_past_its_deadline_fails_and_commits_nothing(
        systems: SystemFactory) -> None:
    system = await started(systems(), ledger())
    await system.get("ledger").send("a", {"n": 1})
    # The short turn deadline only from here: the first turn (activation, a durable commit)
    # may take long on a busy machine; a gated turn cannot beat any deadline.
    await started(system, ledger(timeoutSeconds=0.3))
    kind = system.get("ledger")
    actor_handlers.GATES["slow"] = asyncio.Event()
    with pytest.raises(DeadlineExceeded):
        await kind.send("a", {"n": 2, "gate": "slow"})
    assert (await kind.describe("a"))["state"]["applied"] == [1]


async def test_cancelled_caller_cancels_the_turn(systems: SystemFactory) -> None:
    kind = (await started(systems(), ledger())).get("ledger")
    actor_handlers.GATES["cancel"] = asyncio.Event()
    turn = asyncio.create_task(kind.send("a", {"n": 1, "gate": "cancel"}))
    await eventually(lambda: "a" in kind.active and kind.active["a"].lock.locked(),
                     what="the turn to start")
    turn.cancel()
    with pytest.raises(asyncio.CancelledError):
        await turn
    assert (await kind.send("a", {"n": 2})).reply["count"] == 1


async def test_idle_followup_reaches_an_open_conversation(systems: SystemFactory) -> None:
    kind = (await started(systems(), ledger(idleTimeout="100ms"))).get("ledger")
    followups = kind.subscribe("a")
    await kind.send("a", {"n": 1})
    followup = await asyncio.wait_for(followups.get(), 10)
    assert followup == {"text": "still there? you sent 1"}
    recent = (await kind.describe("a"))["memory"]["recent"]
    assert recent[-1]["role"] == "assistant" and recent[-1]["text"] == followup["text"]
    assert "a" in kind.active  # an open conversation keeps it active
    kind.unsubscribe("a", followups)
    await eventually(lambda: "a" not in kind.active, what="deactivation after the stream")


async def test_timers_fire_in_memory_and_stop_on_deactivation(
        systems: SystemFactory) -> None:
    kind = (await started(systems(), ledger())).get("ledger")
    await kind.send("a", {"n": 1, "timer_every": "50ms"})

    async def beats() -> int:
        return int((await kind.describe("a"))["state"].get("beats", 0))

    await eventually(lambda: _at_least(beats(), 2), what="two timer beats")
    actor = kind.active["a"]
    async with actor.lock:
        kind.residency.retire(actor)
    assert not actor.timers


async def test_ctx_call_uses_capabilities_through_the_engine(systems: SystemFactory) -> None:
    engine = Engine(sample_capabilities())
    kind = (await started(systems(engine=engine), ledger())).get("ledger")
    reply = await kind.send("a", {"n": 1, "call": "echo"})
    assert reply.reply["called"] == {"message": "hi"}


async def test_bad_input_and_unknown_names_are_clear(systems: SystemFactory) -> None:
    system = await started(systems(), ledger(requires={"n": {"type": "integer"}}))
    with pytest.raises(InvalidInput, match=r"message\.n"):
        await system.get("ledger").send("a", {"n": "one"})
    with pytest.raises(InvalidInput, match="id"):
        await system.get("ledger").send("", {"n": 1})
    with pytest.raises(ActorTypeNotFound, match="'nope'"):
        system.get("nope")
    with pytest.raises(ActorNotFound):
        await system.get("ledger").describe("never")


async def test_load_errors_name_the_manifest_field(systems: SystemFactory) -> None:
    system = systems()
    broken = ledger("broken", implementation={"python": {"module": "tests.support."
                                                         "actor_handlers", "class": "Nope"}},
                    schedules=[{"name": "missing", "every": "1h"}])
    errors = await system.replace([broken, ledger("sched", schedules=[
        {"name": "missing", "every": "1h"}])])
    assert [(e.source, e.path) for e in errors] == [
        ("actor broken", "spec.implementation.python.class"),
        ("actor sched", "spec.schedules[0].name")]


async def test_module_functions_and_delete(systems: SystemFactory) -> None:
    manifest = load_text("""
apiVersion: packetflow.io/v1alpha1
kind: Actor
metadata: {name: counter}
spec:
  intent: Count
  implementation: {python: {module: tests.support.actor_handlers}}
  schedules: []
""")
    kind = (await started(systems(), *manifest.actors)).get("counter")
    assert (await kind.send("x", {})).reply == {"count": 1}  # a sync handler, off the loop
    assert (await kind.send("x", {})).reply == {"count": 2}
    assert await kind.delete("x")
    assert not await kind.delete("x")
    assert (await kind.send("x", {})).reply == {"count": 1}


async def test_reload_swaps_changed_types_and_keeps_state(systems: SystemFactory) -> None:
    system = await started(systems(), ledger(), ledger("other"))
    await system.get("ledger").send("a", {"n": 1})
    unchanged = system.get("other")
    assert not await system.replace([ledger(timeoutSeconds=5), ledger("other")])
    assert system.get("other") is unchanged  # untouched types keep running
    assert (await system.get("ledger").send("a", {"n": 2})).reply["count"] == 2
    assert not await system.replace([ledger("other")])
    with pytest.raises(ActorTypeNotFound):
        system.get("ledger")


async def test_metrics_count_activations_turns_and_reminders(systems: SystemFactory) -> None:
    engine = Engine()
    clock = FakeClock()
    kind = (await started(systems(engine=engine, clock=clock), ledger())).get("ledger")
    await kind.send("a", {"n": 1, "remind_every": "1s"})
    clock.now += 2
    await eventually(lambda: _at_least(kind.reminders.fire_due(), 0), what="a poll")
    registry = engine.metrics.registry

    def sample(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, {"actor_type": "ledger", **labels}) or 0.0

    await eventually(lambda: sample("packetflow_actor_reminders_fired_total") >= 1,
                     what="the reminder to be counted")
    assert sample("packetflow_actors_active") == 1
    assert sample("packetflow_actor_activations_total") == 1
    assert sample("packetflow_actor_turn_duration_seconds_count", code="OK") >= 2
    assert sample("packetflow_actor_store_duration_seconds_count", operation="commit") >= 2
