"""PostgreSQL crashes (immediate shutdown) and comes back under load: the actor store and the
shared trigger store fail fast with UNAVAILABLE, recover by themselves, lose nothing
acknowledged and apply nothing twice; the runtime never exits."""

from __future__ import annotations

import asyncio
import collections
import time
from pathlib import Path
from typing import TYPE_CHECKING

from packetflow.client import RuntimeClient
from tests.conftest import eventually
from tests.support.fault_handlers import SOURCE_AND_RECORD, recorded
from tests.support.ledger_load import LedgerLoad
from tests.support.processes import RuntimeProcess

if TYPE_CHECKING:
    from tests.support.postgres import PostgresServer

pytest_plugins = ["tests.support.postgres"]

LEDGER = """
apiVersion: packetflow.io/v1alpha1
kind: Actor
metadata: {name: ledger}
spec:
  intent: Record numbers
  implementation: {python: {module: tests.support.actor_handlers, class: Ledger}}
  store: {postgresql: {dsnFrom: {env: PF_TEST_DSN}}}
"""

TRIGGERED = SOURCE_AND_RECORD + """
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: on-source}
spec:
  intent: Record each completion of source
  implementation:
    composition:
      steps:
        - call: {capability: record, input: {event: "to_string(input.input.n)"}}
      triggers:
        - completed: {capability: source, outcome: success}
"""
OUTAGE_CALLS = 20  # failed sends seen during the outage before the server comes back
RECOVERY_SECONDS = 30.0  # generous for a loaded 2-core machine


async def test_actor_store_outage_fails_fast_and_recovers_without_loss(
        tmp_path: Path, processes: list[RuntimeProcess],
        crashable_postgres: PostgresServer) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "ledger.yaml").write_text(LEDGER)
    runtime = RuntimeProcess(bundle, tmp_path / "state", tmp_path / "runtime.log",
                             {"PF_TEST_DSN": crashable_postgres.create_database()})
    processes.append(runtime)
    load = LedgerLoad("ledger", [f"actor-{i}" for i in range(4)])
    async with RuntimeClient(runtime.address) as client:
        sending = asyncio.create_task(load.run(lambda: client))
        await eventually(lambda: load.least_acked() >= 10, timeout=30, what="acknowledged load")
        await asyncio.to_thread(crashable_postgres.crash)
        crashed = time.monotonic()
        await eventually(lambda: len(load.failures) >= OUTAGE_CALLS, timeout=30,
                         what="sends failing while PostgreSQL is down")
        await asyncio.to_thread(crashable_postgres.restart)
        before = {actor: len(numbers) for actor, numbers in load.acked.items()}
        # Service resumes by itself: no restart of the runtime, no operator action.
        await eventually(lambda: all(len(load.acked[a]) >= before[a] + 10 for a in before),
                         timeout=RECOVERY_SECONDS, what="every actor acknowledging again")
        load.stopping.set()
        await sending
        failed = collections.Counter(code for at, code, _ in load.failures if at >= crashed)
        assert set(failed) == {"UNAVAILABLE"}, failed  # never INTERNAL, never a hang
        assert set(load.codes) == {"OK", "UNAVAILABLE"}, load.codes
        for actor_id, numbers in load.acked.items():
            applied = (await client.get_actor("ledger", actor_id))["state"]["applied"]
            # Every acknowledged message once, in order; at most the last one unacknowledged.
            assert applied[:len(numbers)] == numbers == list(range(len(numbers))), actor_id
            assert len(applied) - len(numbers) <= 1, actor_id
        assert await load.lost_and_twice(client) == (0, 0)
    assert runtime.process.poll() is None, runtime.log.read_text()


async def test_shared_trigger_store_outage_delays_events_and_loses_none(
        tmp_path: Path, processes: list[RuntimeProcess],
        crashable_postgres: PostgresServer) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "triggers.yaml").write_text(TRIGGERED)
    record = tmp_path / "record.jsonl"
    runtime = RuntimeProcess(bundle, tmp_path / "state", tmp_path / "runtime.log", {
        "PACKETFLOW_TRIGGER_STORE_DSN": crashable_postgres.create_database(),
        "PF_FAULT_RECORD": str(record)})
    processes.append(runtime)
    acked: list[int] = []

    async def call(client: RuntimeClient, n: int) -> None:
        await client.invoke("source", {"n": n}, timeout=5)
        acked.append(n)

    def finished() -> collections.Counter[str]:
        return collections.Counter(e["event"] for e in recorded(str(record))
                                   if e["phase"] == "end")

    async with RuntimeClient(runtime.address) as client:
        for n in range(10):
            await call(client, n)
        await eventually(lambda: len(finished()) == 10, timeout=30, what="events before")
        await asyncio.to_thread(crashable_postgres.crash)
        # The calls do not need the trigger store: they succeed; their events wait.
        for n in range(10, 30):
            await call(client, n)
        await asyncio.to_thread(crashable_postgres.restart)
        for n in range(30, 40):
            await call(client, n)
        await eventually(lambda: len(finished()) == len(acked), timeout=RECOVERY_SECONDS,
                         what="every event run after the store came back")
    runs = finished()
    assert set(runs) == {str(n) for n in acked}  # none lost
    assert set(runs.values()) == {1}, runs  # none twice
    assert runtime.process.poll() is None, runtime.log.read_text()
