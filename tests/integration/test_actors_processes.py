"""Actors across real runtime processes: kill -9 durability, placement, the CLI."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import orjson
import pytest

from packetflow.actors.timing import rendezvous_owner
from packetflow.client import CallError, RuntimeClient
from tests.conftest import eventually
from tests.support.processes import RuntimeProcess, free_port, packetflow

pytest_plugins = ["tests.support.postgres"]

LEDGER = """
apiVersion: packetflow.io/v1alpha1
kind: Actor
metadata: {{name: ledger}}
spec:
  intent: Record numbers
  implementation: {{python: {{module: tests.support.actor_handlers, class: Ledger}}}}
  store: {store}
  replicas: {replicas}
"""


def bundle(tmp_path: Path, store: str, replicas: int = 1) -> Path:
    path = tmp_path / "bundle"
    path.mkdir(exist_ok=True)
    (path / "ledger.yaml").write_text(LEDGER.format(store=store, replicas=replicas))
    return path


async def kill_during_acknowledged_stream(tmp_path: Path, store: str,
                                          processes: list[RuntimeProcess],
                                          env: dict[str, str] | None = None) -> None:
    """Four actors receive numbered messages; the runtime is killed mid-stream; after a
    restart each unacknowledged message is retried with its id. Every acknowledged message
    must be applied exactly once, in order."""
    source = bundle(tmp_path, store)
    log = tmp_path / "runtime.log"
    first = RuntimeProcess(source, tmp_path / "state", log, env)
    processes.append(first)
    acked: dict[str, list[int]] = {f"actor-{i}": [] for i in range(4)}
    unacked: dict[str, int] = {}

    async def stream(client: RuntimeClient, actor_id: str) -> None:
        for n in range(10_000):
            try:
                await client.send("ledger", actor_id, {"n": n}, message_id=f"{actor_id}:{n}",
                                  timeout=10)
            except CallError as exc:
                assert exc.code == grpc.StatusCode.UNAVAILABLE, exc
                unacked[actor_id] = n
                return
            acked[actor_id].append(n)

    async with RuntimeClient(first.address) as client:
        streams = [asyncio.create_task(stream(client, actor_id)) for actor_id in acked]
        await eventually(lambda: min(len(a) for a in acked.values()) >= 30,
                         what="acknowledged messages")
        first.kill()
        await asyncio.gather(*streams)
    second = RuntimeProcess(source, tmp_path / "state", log, env, address=first.address)
    processes.append(second)
    async with RuntimeClient(second.address) as client:
        for actor_id, n in unacked.items():
            await client.send("ledger", actor_id, {"n": n}, message_id=f"{actor_id}:{n}")
            acked[actor_id].append(n)
        for actor_id, numbers in acked.items():
            applied = (await client.get_actor("ledger", actor_id))["state"]["applied"]
            assert applied == numbers == list(range(len(numbers))), actor_id
    second.stop()


async def test_kill_9_loses_nothing_and_applies_nothing_twice_sqlite(
        tmp_path: Path, processes: list[RuntimeProcess]) -> None:
    await kill_during_acknowledged_stream(tmp_path, "{sqlite: {}}", processes)


async def test_kill_9_loses_nothing_and_applies_nothing_twice_postgresql(
        tmp_path: Path, processes: list[RuntimeProcess], postgres_dsn: str) -> None:
    await kill_during_acknowledged_stream(
        tmp_path, "{postgresql: {dsnFrom: {env: PF_TEST_DSN}}}", processes,
        {"PF_TEST_DSN": postgres_dsn})


async def test_placement_forwards_to_the_owner_and_moves_on_membership_change(
        tmp_path: Path, processes: list[RuntimeProcess], postgres_dsn: str) -> None:
    source = bundle(tmp_path, "{postgresql: {dsnFrom: {env: PF_TEST_DSN}}}", replicas=2)
    members = {}
    for name in ("m1", "m2"):
        address = f"127.0.0.1:{free_port()}"
        members[name] = RuntimeProcess(source, tmp_path / name, tmp_path / f"{name}.log", {
            "PF_TEST_DSN": postgres_dsn, "PACKETFLOW_MEMBER_ID": name,
            "PACKETFLOW_ADVERTISE_ADDRESS": address}, address=address)
        processes.append(members[name])
    ids = [f"user-{i}" for i in range(12)]
    owners = {i: rendezvous_owner(i, ["m1", "m2"]) for i in ids}
    assert set(owners.values()) == {"m1", "m2"}
    async with RuntimeClient(members["m1"].address) as m1, \
            RuntimeClient(members["m2"].address) as m2:
        clients = {"m1": m1, "m2": m2}

        async def placed_on_owners() -> bool:
            # m1 learns of m2 by heartbeat: until then it keeps everything itself.
            for actor_id in ids:
                await m1.send("ledger", actor_id, {"n": 0})
            for name, client in clients.items():
                active = {a["id"] for a in await client.list_actors("ledger") if a["active"]}
                if active != {i for i, owner in owners.items() if owner == name}:
                    return False
            return True

        await eventually(placed_on_owners, timeout=15, what="actors active on their owners")
        before = {i: (await m1.get_actor("ledger", i))["state"]["applied"] for i in ids}
        members["m2"].stop()  # leaves the group: m1 owns every actor now
        moved = next(i for i, owner in owners.items() if owner == "m2")

        async def served_locally() -> bool:
            await m1.send("ledger", moved, {"n": 1})
            return moved in {a["id"] for a in await m1.list_actors("ledger") if a["active"]}

        await eventually(served_locally, timeout=15, what="m1 to take over m2's actors")
        applied = (await m1.get_actor("ledger", moved))["state"]["applied"]
        assert applied[:len(before[moved])] == before[moved]  # state moved through the store



# Eight CLI processes, each seconds to start on a busy machine: past the default 120 s.
@pytest.mark.timeout(300)
def test_cli_send_and_actors_commands(tmp_path: Path,
                                      processes: list[RuntimeProcess]) -> None:
    runtime = RuntimeProcess(bundle(tmp_path, "{sqlite: {}}"), tmp_path / "state",
                             tmp_path / "runtime.log")
    processes.append(runtime)
    address = ("--address", runtime.address)
    sent = packetflow("send", "ledger", "a", "--data", '{"n": 5, "note": "hello"}',
                      "--message-id", "q-17", *address)
    assert sent.returncode == 0, sent.stderr
    assert orjson.loads(sent.stdout) == {"n": 5, "count": 1}
    # A retry with the same --message-id is not applied again: it answers the first reply.
    retried = packetflow("send", "ledger", "a", "--data", '{"n": 6}', "--message-id", "q-17",
                         *address)
    assert orjson.loads(retried.stdout) == {"n": 5, "count": 1}, retried.stderr
    listed = packetflow("actors", "list", "ledger", *address)
    assert listed.stdout.splitlines() == ["a\t1\tactive"]
    got = orjson.loads(packetflow("actors", "get", "ledger", "a", *address).stdout)
    assert got["state"] == {"applied": [5]}
    assert [e["text"] for e in got["memory"]["recent"]] == ["hello"]
    assert got["reminders"] == []
    deleted = packetflow("actors", "delete", "ledger", "a", *address)
    assert deleted.returncode == 0 and "deleted ledger/a" in deleted.stdout
    gone = packetflow("actors", "get", "ledger", "a", *address)
    assert gone.returncode == 1 and gone.stderr.startswith("error: NOT_FOUND")
    bad = packetflow("send", "ledger", "a", "--data", "{oops", *address)
    assert bad.returncode == 2 and "--data is not valid JSON" in bad.stderr
