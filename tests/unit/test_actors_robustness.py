"""The actor runtime under failure: double firing, failed turns, store errors, cancelled
activations, stale leases, worker-thread timers, reloads and shutdown (real stores)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from packetflow import serve
from packetflow.actors import ActorSystem
from packetflow.actors.active import Turn
from packetflow.actors.errors import StoreRefused
from packetflow.actors.store import Commit, MemoryEntry
from packetflow.engine import Engine
from packetflow.errors import ContractViolation, DeadlineExceeded, HandlerFailed
from packetflow.server import RuntimeServer
from packetflow.settings import RuntimeSettings
from packetflow.spec import Actor
from tests.conftest import eventually
from tests.support import actor_handlers
from tests.support.actors import FakeClock, SystemFactory, handler_actor

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

pytest_plugins = ["tests.support.postgres"]


def fragile(name: str = "fragile", cls: str = "Fragile", **spec: Any) -> Actor:
    """An Actor manifest for a handler class of ``tests.support.actor_handlers``."""
    return handler_actor(name, cls, "Fail in interesting ways", **spec)


@pytest.fixture(autouse=True)
def gates() -> Iterator[dict[str, asyncio.Event]]:
    """The handlers' gates, opened and removed after each test."""
    yield actor_handlers.GATES
    for gate in actor_handlers.GATES.values():
        gate.set()
    actor_handlers.GATES.clear()


async def started(system: ActorSystem, *actors: Actor) -> ActorSystem:
    errors = await system.replace(actors)
    assert not errors, errors
    return system


def store_of(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    if backend == "postgresql":
        return {"postgresql": {"dsn": request.getfixturevalue("postgres_dsn")}}
    return {"sqlite": {"path": str(tmp_path / "shared.db")}}


async def state_of(system: ActorSystem, actor_id: str, name: str = "fragile") -> Any:
    return (await system.get(name).describe(actor_id))["state"]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_one_reminder_slot_is_applied_once_across_members(
        systems: SystemFactory, backend: str, request: pytest.FixtureRequest,
        tmp_path: Path) -> None:
    clock = FakeClock()
    store = store_of(backend, request, tmp_path)
    a = await started(systems(member_id="a", clock=clock, reminder_poll=3600),
                      fragile(store=store))
    b = await started(systems(member_id="b", clock=clock, reminder_poll=3600),
                      fragile(store=store))
    await a.get("fragile").send("x", {"remind": "tick"})
    clock.now += 2
    # Two members whose membership views briefly differ both see the slot due...
    due_a = await a.get("fragile").store.due(clock.now)
    due_b = await b.get("fragile").store.due(clock.now)
    assert len(due_a) == len(due_b) == 1
    # ...and both fire it: the second turn is refused as a whole.
    assert await a.get("fragile").reminders.fire("x", due_a[0].reminder, clock.now) == 1
    assert await b.get("fragile").reminders.fire("x", due_b[0].reminder, clock.now) == 0
    assert (await state_of(b, "x"))["ticks"] == 1
    assert (await b.get("fragile").describe("x"))["reminders"] == []


async def test_a_failed_turn_leaves_no_memory_behind(systems: SystemFactory) -> None:
    kind = (await started(systems(), fragile())).get("fragile")
    with pytest.raises(HandlerFailed):
        await kind.send("a", {"q": "boom", "fail": True})
    await kind.send("a", {"q": "ok"})
    recent = (await kind.describe("a"))["memory"]["recent"]
    # on_start's entry commits with the first turn that succeeds; the failed turn's does not.
    assert [entry["text"] for entry in recent] == ["started", "turn ok"]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_store_errors_are_domain_errors(systems: SystemFactory, backend: str,
                                              request: pytest.FixtureRequest,
                                              tmp_path: Path) -> None:
    kind = (await started(systems(), fragile(store=store_of(backend, request, tmp_path)))
            ).get("fragile")
    # Bad data fails the turn that passed it, naming the field; the actor keeps working.
    with pytest.raises(ContractViolation, match=r"memory\.append: data"):
        await kind.send("a", {"bad_data": True})
    assert (await kind.send("a", {"q": "fine"})).reply == {"ok": True}
    # What the store itself cannot hold is refused as a domain error, not a driver error.
    epoch = kind.active["a"].epoch
    texts = ["nul\x00byte"] if backend == "postgresql" else []
    for text, data in [("x", {1}), *((t, None) for t in texts)]:
        with pytest.raises(StoreRefused):
            await kind.store.commit(Commit("a", epoch, b"{}", 0.0, 99,
                                           [MemoryEntry(99, 0.0, "note", text, data)]))
    assert (await kind.send("a", {"q": "still fine"})).reply == {"ok": True}


async def test_background_loops_outlive_unexpected_errors_and_close_cleanly(
        systems: SystemFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    system = await started(systems(clock=clock), fragile(), fragile("other"))
    kind = system.get("fragile")
    due = kind.store.due
    failures = []

    async def broken_once(now: float, *page: Any) -> Any:
        if not failures:
            failures.append(now)
            raise RuntimeError("a bug in the store")
        return await due(now, *page)

    monkeypatch.setattr(kind.store, "due", broken_once)
    await eventually(lambda: bool(failures), what="the reminder loop to hit the error")
    await kind.send("a", {"remind": "tick"})
    clock.now += 2
    await eventually(lambda: _ticks(kind, "a"), timeout=5, what="the reminder after the error")
    other = system.get("other")
    await system.aclose()  # every type stops and closes
    assert not system.types
    assert getattr(other.store, "_conn", "missing") is None


async def _ticks(kind: Any, actor_id: str) -> bool:
    return bool((await kind.describe(actor_id))["state"].get("ticks", 0) >= 1)


async def test_on_start_runs_within_the_turn_deadline(systems: SystemFactory,
                                                      gates: dict[str, asyncio.Event]) -> None:
    kind = (await started(systems(), fragile(timeoutSeconds=0.3))).get("fragile")
    gates["start"] = asyncio.Event()
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(kind.send("a", {"q": "x"}), 5)
    assert "a" not in kind.active  # not half-started: the next turn starts it afresh
    gates["start"].set()
    assert (await kind.send("a", {"q": "y"})).reply == {"ok": True}
    assert (await kind.describe("a"))["state"] == {"ready": True}


async def test_a_cancelled_activation_starts_again(systems: SystemFactory,
                                                   gates: dict[str, asyncio.Event]) -> None:
    kind = (await started(systems(), fragile())).get("fragile")
    gates["start"] = asyncio.Event()
    before = actor_handlers.Fragile.starts
    first = asyncio.create_task(kind.send("a", {"q": "x"}))
    await eventually(lambda: actor_handlers.Fragile.starts > before, what="on_start")
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    gates["start"].set()
    await kind.send("a", {"q": "y"})
    assert actor_handlers.Fragile.starts == before + 2  # on_start ran again, in full
    described = await kind.describe("a")
    assert described["state"] == {"ready": True}
    assert [e["text"] for e in described["memory"]["recent"]] == ["started", "turn y"]


async def test_a_stale_lease_retries_instead_of_losing_the_message(
        systems: SystemFactory, tmp_path: Path) -> None:
    store = {"sqlite": {"path": str(tmp_path / "shared.db")}}
    a = await started(systems(member_id="a"), fragile(store=store))
    b = await started(systems(member_id="b"), fragile(store=store))
    await a.get("fragile").send("x", {"q": "1"})
    assert await b.get("fragile").delete("x")  # another member deletes it
    assert (await a.get("fragile").send("x", {"q": "2"})).reply == {"ok": True}
    described = await a.get("fragile").describe("x")
    assert [e["text"] for e in described["memory"]["recent"]] == ["started", "turn 2"]


async def test_sync_handlers_can_use_timers(systems: SystemFactory) -> None:
    kind = (await started(systems(), fragile("sync", "SyncTimers"))).get("sync")
    assert (await kind.send("a", {})).reply == {"timers": ["beat"]}

    async def beats() -> bool:
        return bool((await kind.describe("a"))["state"].get("beats", 0) >= 2)

    await eventually(beats, what="two timer beats armed from a worker thread")


async def test_an_idle_turn_does_not_reactivate_an_evicted_actor(
        systems: SystemFactory) -> None:
    kind = (await started(systems(), fragile("ledger", "Ledger", idleTimeout="1h"))
            ).get("ledger")
    await kind.send("a", {"n": 1})
    actor = kind.active["a"]
    kind.reap_idle(now=actor.last_used + 7200)  # spawns the idle turn (on_idle)...
    kind.residency.retire(actor)  # ...and the actor is evicted before it runs
    await asyncio.gather(*kind._background)
    assert "a" not in kind.active
    assert (await kind.describe("a"))["memory"]["count"] == 0  # no follow-up was written
    # A stale entry's turn is skipped outright.
    assert await kind._turn_on(actor, Turn("idle")) is None


async def test_a_slow_reminder_does_not_hold_up_others(systems: SystemFactory,
                                                       gates: dict[str, asyncio.Event]) -> None:
    clock = FakeClock()
    kind = (await started(systems(clock=clock), fragile())).get("fragile")
    gates["slow_tick"] = asyncio.Event()
    await kind.send("slow", {"remind": "slow_tick"})
    clock.now += 2
    await eventually(lambda: "slow" in kind.active and kind.active["slow"].lock.locked(),
                     what="the slow reminder to start")
    await kind.send("quick", {"remind": "tick"})
    clock.now += 2
    await eventually(lambda: _ticks(kind, "quick"), timeout=5,
                     what="the other reminder while the slow one runs")
    gates["slow_tick"].set()

    async def slow_done() -> bool:
        return bool((await kind.describe("slow"))["state"].get("slow_ticks") == 1)

    await eventually(slow_done, what="the slow reminder")


async def test_reload_reports_store_errors_and_keeps_the_running_version(
        systems: SystemFactory, tmp_path: Path) -> None:
    system = await started(systems(), fragile())
    running = system.get("fragile")
    (tmp_path / "corrupt.db").write_bytes(b"this is not a sqlite database" * 100)
    errors = await system.replace([
        fragile("fragile", "Nope"),  # a changed version that does not load
        fragile("corrupt"),
        fragile("baddsn", store={"postgresql": {"dsn": "not a dsn"}}),
    ])
    assert [(e.source, e.path) for e in errors] == [
        ("actor fragile", "spec.implementation.python.class"),
        ("actor corrupt", "spec.store"), ("actor baddsn", "spec.store")]
    assert "not a database" in errors[1].message
    assert system.get("fragile") is running  # still serving
    assert (await running.send("a", {"q": "x"})).reply == {"ok": True}
    assert not [t for t in threading.enumerate() if t.name.startswith("sqlite-corrupt")]


async def test_stop_has_one_deadline_for_all_busy_actors(
        systems: SystemFactory, gates: dict[str, asyncio.Event]) -> None:
    kind = (await started(systems(), fragile("ledger", "Ledger"))).get("ledger")
    gates["busy"] = asyncio.Event()
    busy = 30
    turns = [asyncio.create_task(kind.send(f"id-{i}", {"n": i, "gate": "busy"}))
             for i in range(busy)]
    await eventually(lambda: sum(a.lock.locked() for a in kind.active.values()) == busy,
                     what="the busy actors")
    # The turns never finish: one grace period for all of them ends stop after 0.5 s, a
    # grace period each would take 15 s. The bound sits far from both.
    await asyncio.wait_for(kind.stop(grace=0.5), 7.5)
    assert not kind.active
    for turn in turns:
        turn.cancel()
    await asyncio.gather(*turns, return_exceptions=True)


async def test_the_reloader_outlives_a_failed_reload(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text("# nothing yet\n")
    calls: list[int] = []
    real_load = serve.load_paths

    def load(paths: Any) -> Any:
        calls.append(len(calls))
        if len(calls) == 1:
            raise RuntimeError("a bug while loading")
        return real_load(paths)

    monkeypatch.setattr(serve, "RELOAD_POLL_SECONDS", 0.02)
    monkeypatch.setattr(serve, "load_paths", load)
    engine = Engine()
    reloader = asyncio.create_task(serve._reload_on_change(
        [tmp_path], serve._snapshot([tmp_path]), engine))
    try:
        for touch in (1, 2):
            os.utime(manifest, (touch, touch))
            await eventually(lambda touch=touch: len(calls) >= touch,  # type: ignore[misc]
                             what=f"reload {touch}")
        assert not reloader.done()
    finally:
        reloader.cancel()
        await asyncio.gather(reloader, return_exceptions=True)
        await engine.aclose()


async def test_a_manifest_written_as_readiness_is_announced_is_served(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Found by CI: the reloader took its first snapshot only after readiness was announced,
    # so a file written in between was part of it, never a change, and never served.
    monkeypatch.setattr(serve, "RELOAD_POLL_SECONDS", 0.02)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    settings = RuntimeSettings(address="127.0.0.1:0", metrics_address=None,
                               state_dir=tmp_path / "state", drain_seconds=0,
                               grace_seconds=5)
    ready: asyncio.Future[RuntimeServer] = asyncio.get_running_loop().create_future()

    def on_ready(server: RuntimeServer, metrics_port: int | None) -> None:
        # Written before the reloader's task has run at all.
        shutil.copy(EXAMPLES / "echo.yaml", bundle / "echo.yaml")
        ready.set_result(server)

    served = asyncio.create_task(serve.serve([bundle], settings, watch=True, strict=False,
                                             on_ready=on_ready))
    server = await asyncio.wait_for(ready, 60)
    try:
        await eventually(lambda: "echo" in server.engine.served, timeout=30,
                         what="the manifest written at readiness, served")
    finally:
        os.kill(os.getpid(), signal.SIGTERM)  # serve() drains on it, as a pod would
        assert await asyncio.wait_for(served, 60) == 0
