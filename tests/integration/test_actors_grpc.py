"""The ActorRuntime gRPC service on a real grpc.aio server, through the Python client."""

from __future__ import annotations

import asyncio
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
from packetflow.server import ACTOR_SERVICE_NAME, RuntimeServer
from tests.support.manifests import sample_capabilities

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
