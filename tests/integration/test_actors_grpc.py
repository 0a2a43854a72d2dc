"""The ActorRuntime gRPC service on a real grpc.aio server, through the Python client."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from packetflow.actors import ActorSystem
from packetflow.client import CallError, RuntimeClient
from packetflow.engine import Engine
from packetflow.manifests import load_text
from packetflow.rpc import ACTOR_SERVICE_NAME
from packetflow.server import RuntimeServer
from tests.conftest import eventually
from tests.support.manifests import sample_capabilities

pytest_plugins = ["tests.support.postgres"]

MANIFEST = """
apiVersion: packetflow.io/v1alpha1
kind: Actor
metadata: {name: ledger}
spec:
  intent: Record numbers
  requires: {n: {type: integer}}
  implementation: {python: {module: tests.support.actor_handlers, class: Ledger}}
  idleTimeout: 300ms
"""


@pytest.fixture
async def actor_client(tmp_path: Path) -> AsyncIterator[RuntimeClient]:
    engine = Engine(sample_capabilities())
    system = ActorSystem(engine, state_dir=tmp_path)
    assert not await system.replace(load_text(MANIFEST).actors)
    server = await RuntimeServer.start(engine, "127.0.0.1:0", system)
    try:
        async with RuntimeClient(f"127.0.0.1:{server.port}") as client:
            yield client
    finally:
        await server.stop(grace=0)
        await system.aclose()


async def test_send_get_list_delete(actor_client: RuntimeClient) -> None:
    assert await actor_client.send("ledger", "a", {"n": 1}) == {"n": 1, "count": 1}
    assert await actor_client.send("ledger", "b", {"n": 2}, message_id="x") == {"n": 2,
                                                                               "count": 1}
    assert await actor_client.send("ledger", "b", {"n": 2}, message_id="x") == {"n": 2,
                                                                               "count": 1}
    listed = await actor_client.list_actors("ledger")
    assert [(a["id"], a["version"], a["active"]) for a in listed] == [("a", 1, True),
                                                                       ("b", 1, True)]
    described = await actor_client.get_actor("ledger", "b")
    assert described["state"] == {"applied": [2]}
    assert described["memory"] == {"count": 0, "recent": []}
    assert await actor_client.delete_actor("ledger", "b")
    assert not await actor_client.delete_actor("ledger", "b")


async def test_errors_map_to_status_codes(actor_client: RuntimeClient) -> None:
    with pytest.raises(CallError) as bad:
        await actor_client.send("ledger", "a", {"n": "one"})
    assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in bad.value.violations] == ["message.n"]
    with pytest.raises(CallError) as missing:
        await actor_client.send("nope", "a", {})
    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(CallError) as unknown:
        await actor_client.get_actor("ledger", "never")
    assert unknown.value.code == grpc.StatusCode.NOT_FOUND


async def test_converse_replies_in_order_and_pushes_followups(
        actor_client: RuntimeClient) -> None:
    sent: asyncio.Queue[Any] = asyncio.Queue()
    for n in range(3):
        sent.put_nowait({"n": n})

    async def messages() -> AsyncIterator[Any]:
        while (message := await sent.get()) is not None:
            yield message

    events = []
    async for event in actor_client.converse("ledger", "talk", messages()):
        events.append(event)
        if event.kind == "followup":
            sent.put_nowait(None)
    assert [(e.kind, e.message) for e in events] == [
        ("reply", {"n": 0, "count": 1}), ("reply", {"n": 1, "count": 2}),
        ("reply", {"n": 2, "count": 3}), ("followup", {"text": "still there? you sent 3"})]


async def test_health_and_reflection_list_the_actor_service(actor_client: RuntimeClient
                                                            ) -> None:
    stub = health_pb2_grpc.HealthStub(actor_client.channel)
    status = await stub.Check(health_pb2.HealthCheckRequest(service=ACTOR_SERVICE_NAME))
    assert status.status == health_pb2.HealthCheckResponse.SERVING


async def test_an_unexpected_error_ends_the_conversation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine()
    system = ActorSystem(engine, state_dir=tmp_path)
    assert not await system.replace(load_text(MANIFEST).actors)
    server = await RuntimeServer.start(engine, "127.0.0.1:0", system)

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug below the servicer")

    monkeypatch.setattr(system.get("ledger"), "send", broken)
    hold = asyncio.Event()

    async def messages() -> AsyncIterator[Any]:
        yield {"n": 1}
        await hold.wait()  # the client keeps the stream open

    try:
        async with RuntimeClient(f"127.0.0.1:{server.port}") as client:
            async def talk() -> list[Any]:
                return [event async for event in client.converse("ledger", "a", messages())]

            with pytest.raises(CallError) as failed:
                await asyncio.wait_for(talk(), 10)
            assert failed.value.code == grpc.StatusCode.INTERNAL
    finally:
        hold.set()
        await server.stop(grace=0)
        await system.aclose()


async def test_stop_closes_the_forwarders_channels(tmp_path: Path) -> None:
    engine = Engine()
    system = ActorSystem(engine, state_dir=tmp_path)
    server = await RuntimeServer.start(engine, "127.0.0.1:0", system)
    forwarder = server.forwarder
    assert forwarder is not None and system.forwarder is forwarder
    forwarder._stub("127.0.0.1:9")  # a channel to another member
    await server.stop(grace=0)
    await system.aclose()
    assert not forwarder.channels


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_delete_reaches_the_owning_member(postgres_dsn: str, tmp_path: Path) -> None:
    manifest = load_text(MANIFEST.replace("idleTimeout: 300ms", f"""replicas: 2
  store: {{postgresql: {{dsn: "{postgres_dsn}"}}}}""")).actors
    members = []
    try:
        for name in ("a", "b"):
            address = f"127.0.0.1:{_free_port()}"
            engine = Engine()
            # The default heartbeat (1 s, members live 3 s): shorter ones let a busy machine
            # drop a member between beats and move the actor mid-test.
            system = ActorSystem(engine, state_dir=tmp_path, member_id=name, address=address)
            assert not await system.replace(manifest)
            members.append((system, await RuntimeServer.start(engine, address, system)))
        (a, _), (b, _) = members

        def placed() -> bool:
            return all(len(s.get("ledger").placement.members) == 2  # type: ignore[union-attr]
                       for s, _ in members)

        await eventually(placed, what="both members to see each other")
        placement = a.get("ledger").placement
        assert placement is not None
        actor_id = next(f"id-{i}" for i in range(1000) if placement.owner(f"id-{i}") == "b")
        await a.get("ledger").send(actor_id, {"n": 1})  # forwarded to b, active there
        assert actor_id in b.get("ledger").active and actor_id not in a.get("ledger").active
        assert await a.get("ledger").delete(actor_id)
        assert actor_id not in b.get("ledger").active  # the owner deactivated it
        assert (await b.get("ledger").send(actor_id, {"n": 2})).reply == {"n": 2, "count": 1}
    finally:
        for system, server in members:
            await server.stop(grace=0)
            await system.aclose()
