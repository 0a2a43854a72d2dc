"""Actor gaps closed: a reminder backlog larger than a page, follow-ups of a conversation
forwarded to another member, ``mcp --stdio`` with a multi-member type, pruned channels.
Real stores (SQLite, PostgreSQL), real gRPC servers."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from packetflow.actors import ActorSystem
from packetflow.actors.runtime import ActorType
from packetflow.client import RuntimeClient
from packetflow.engine import Engine
from packetflow.manifests import load_text
from packetflow.server import RuntimeServer
from tests.conftest import eventually
from tests.support import actor_handlers
from tests.support.actors import FakeClock, SystemFactory, handler_actor

pytest_plugins = ["tests.support.postgres"]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def gates() -> Iterator[dict[str, asyncio.Event]]:
    """The handlers' gates, opened and removed after each test."""
    yield actor_handlers.GATES
    for gate in actor_handlers.GATES.values():
        gate.set()
    actor_handlers.GATES.clear()


async def test_reminders_past_the_first_page_fire_while_the_first_page_is_busy(
        systems: SystemFactory, gates: dict[str, asyncio.Event]) -> None:
    clock = FakeClock()
    system = systems(clock=clock, reminder_poll=0.02)
    assert not await system.replace([handler_actor("fragile", "Fragile")])
    kind = system.get("fragile")
    kind.reminders.due_page = 3  # a small page, so the backlog needs several
    gates["slow_tick"] = asyncio.Event()
    slow = [f"slow-{i}" for i in range(4)]  # more stuck reminders than one page holds
    for actor_id in slow:
        await kind.send(actor_id, {"remind": "slow_tick"})
    clock.now += 2
    await eventually(lambda: len(kind.reminders.firing) == len(slow),
                     what="every slow reminder to be firing")
    await kind.send("quick", {"remind": "tick"})
    clock.now += 2

    async def quick_ticked() -> bool:
        return bool((await kind.describe("quick"))["state"].get("ticks") == 1)

    # Without keyset paging the loop only ever reads the first (busy) page: starved.
    await eventually(quick_ticked, timeout=20, what="the reminder past the busy pages")
    assert all(key[0] in slow for key in kind.reminders.firing)  # the slow ones are still running
    gates["slow_tick"].set()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ledger(dsn: str, idle: str = "300ms") -> str:
    return f"""
apiVersion: packetflow.io/v1alpha1
kind: Actor
metadata: {{name: ledger}}
spec:
  intent: Record numbers
  requires: {{n: {{type: integer}}}}
  implementation: {{python: {{module: tests.support.actor_handlers, class: Ledger}}}}
  idleTimeout: {idle}
  replicas: 2
  store: {{postgresql: {{dsn: "{dsn}"}}}}
"""


@asynccontextmanager
async def members(dsn: str, tmp_path: Path, names: tuple[str, ...] = ("a", "b"),
                  idle: str = "300ms",
                  ) -> AsyncIterator[list[tuple[ActorSystem, RuntimeServer]]]:
    """Member runtimes of the ledger type sharing PostgreSQL, once they see each other."""
    manifest = load_text(_ledger(dsn, idle)).actors
    started: list[tuple[ActorSystem, RuntimeServer]] = []
    try:
        for name in names:
            address = f"127.0.0.1:{_free_port()}"
            engine = Engine()
            system = ActorSystem(engine, state_dir=tmp_path / name, member_id=name,
                                 address=address, heartbeat_interval=0.2)
            assert not await system.replace(manifest)
            started.append((system, await RuntimeServer.start(engine, address, system)))

        def placed() -> bool:
            return all(len(_placement(s.get("ledger")).members) == len(names)
                       for s, _ in started)

        await eventually(placed, timeout=20, what="the members to see each other")
        yield started
    finally:
        for system, server in started:
            await server.stop(grace=0)
            await system.aclose()


def _placement(kind: ActorType) -> Any:
    assert kind.placement is not None
    return kind.placement


def owned_by(kind: ActorType, member: str) -> str:
    placement = _placement(kind)
    return next(f"id-{i}" for i in range(1000) if placement.owner(f"id-{i}") == member)


async def test_a_forwarded_conversation_gets_the_owners_followups(postgres_dsn: str,
                                                                  tmp_path: Path) -> None:
    async with members(postgres_dsn, tmp_path) as started:
        (a, a_server), (b, _) = started
        actor_id = owned_by(a.get("ledger"), "b")
        sent: asyncio.Queue[Any] = asyncio.Queue()
        for n in range(2):
            sent.put_nowait({"n": n})

        async def messages() -> AsyncIterator[Any]:
            while (message := await sent.get()) is not None:
                yield message

        events = []
        async with RuntimeClient(f"127.0.0.1:{a_server.port}") as client:
            async def talk() -> None:
                async for event in client.converse("ledger", actor_id, messages()):
                    events.append((event.kind, event.message))
                    if event.kind == "followup":
                        sent.put_nowait(None)

            await asyncio.wait_for(talk(), 60)
        assert actor_id in b.get("ledger").active or actor_id not in a.get("ledger").active
        assert events == [("reply", {"n": 0, "count": 1}), ("reply", {"n": 1, "count": 2}),
                          ("followup", {"text": "still there? you sent 2"})]


async def test_channels_to_departed_members_are_pruned(postgres_dsn: str,
                                                       tmp_path: Path) -> None:
    async with members(postgres_dsn, tmp_path, ("a", "b", "c")) as started:
        (a, a_server), _, (c, c_server) = started
        kind = a.get("ledger")
        await kind.send(owned_by(kind, "c"), {"n": 1})  # forwarded: a channel to c
        forwarder = a_server.forwarder
        assert forwarder is not None
        c_address = _placement(c.get("ledger")).address
        assert c_address in forwarder.channels
        await c_server.stop(grace=0)
        await c.aclose()  # leaves the group
        started.remove((c, c_server))
        await eventually(lambda: c_address not in forwarder.channels, timeout=20,
                         what="the channel to the departed member to close")
        assert len(_placement(kind).members) == 2


async def test_stdio_observer_forwards_to_members_and_owns_nothing(postgres_dsn: str,
                                                                   tmp_path: Path) -> None:
    """What ``packetflow mcp --stdio`` builds for a multi-member type: an observer that
    never joins placement (no port to be reached at) and forwards every message."""
    from packetflow.actors.service import attach
    from packetflow.serve import actor_system
    from packetflow.settings import RuntimeSettings

    async with members(postgres_dsn, tmp_path, idle="1h") as started:
        engine = Engine()
        observer = actor_system(engine, RuntimeSettings(state_dir=tmp_path / "stdio"),
                                observer=True)
        forwarder = attach(observer)
        try:
            assert not await observer.replace(load_text(_ledger(postgres_dsn, "1h")).actors)
            kind = observer.get("ledger")
            await eventually(lambda: len(_placement(kind).members) == 2, timeout=20,
                             what="the observer to see the members")
            assert observer.member_id not in _placement(kind).members
            for n in range(10):
                result = await kind.send(f"stdio-{n}", {"n": n})
                assert result.reply == {"n": n, "count": 1}
            assert not kind.active  # every message ran at a member
            served = {actor_id for system, _ in started
                      for actor_id in system.get("ledger").active}
            assert served == {f"stdio-{n}" for n in range(10)}
        finally:
            await observer.aclose()
            await forwarder.close()


async def test_mcp_stdio_serves_a_multi_member_type_through_its_members(
        postgres_dsn: str, tmp_path: Path) -> None:
    import os
    import sys

    from mcp.client import Client
    from mcp.client.stdio import StdioServerParameters

    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "ledger.yaml").write_text(_ledger(postgres_dsn, "1h"))
    async with members(postgres_dsn, tmp_path, idle="1h") as started:
        params = StdioServerParameters(
            command=sys.executable, args=["-m", "packetflow.cli", "mcp", "--stdio",
                                          str(tmp_path / "bundle"), "--state-dir",
                                          str(tmp_path / "stdio")],
            cwd=str(ROOT), env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
        async with Client(params, mode="legacy") as client:
            for n in range(20):
                result = await client.call_tool("ledger", {"actor_id": f"m-{n}", "n": n})
                assert not result.is_error and result.structured_content == {"n": n,
                                                                              "count": 1}
        served = {actor_id for system, _ in started for actor_id in system.get("ledger").active}
        assert served == {f"m-{n}" for n in range(20)}  # every turn ran at a member
