"""kill -9 of a runtime while triggered compositions run: after a restart every event runs to
completion exactly once, and a schedule catches up the fire time it missed.

The at-least-once window, stated and asserted: an event is run again after the restart exactly
when its claim (idempotency key: a completion's call id, a schedule's fire time) was not yet
marked done in the trigger store at the kill. That is every run under way (its side effects
before the kill happen twice, its ``end`` once), plus a run that had finished its work but
died before recording its completion (its ``end`` then happens twice: the only duplicate the
keys allow). Every other event, done or not yet due, runs once.
"""

from __future__ import annotations

import collections
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson

from packetflow.client import RuntimeClient
from tests.conftest import eventually
from tests.support.fault_handlers import SOURCE_AND_RECORD, recorded
from tests.support.processes import RuntimeProcess

BUNDLE = SOURCE_AND_RECORD + """
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: on-source}
spec:
  intent: Record each completion of source
  implementation:
    composition:
      steps:
        - call: {capability: record, input: {event: "join('', ['n', to_string(input.input.n)])",
                                             seconds: "`3`"}}
      triggers:
        - completed: {capability: source, outcome: success}
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: tick}
spec:
  intent: Record each fire time of a schedule
  implementation:
    composition:
      steps:
        - call: {capability: record, input: {event: input.scheduledAt, seconds: "`1`"}}
      triggers:
        - schedule: "*/2 * * * * *"
"""
LEASE_SECONDS = "2"


def unfinished(state: Path) -> set[str]:
    """The events whose claims were not done in the trigger store, by their record names."""
    with sqlite3.connect(state / "triggers.db") as db:
        rows = db.execute("SELECT event FROM pf_trigger_claims WHERE done = 0").fetchall()
    events = [orjson.loads(event) for event, in rows]
    return {f"n{e['input']['n']}" if e["type"] == "completed" else e["scheduledAt"]
            for e in events}


def runs(path: Path) -> dict[str, list[tuple[int, str]]]:
    """Event -> its (pid, phase) records, in order."""
    found: dict[str, list[tuple[int, str]]] = collections.defaultdict(list)
    for entry in recorded(str(path)):
        found[entry["event"]].append((entry["pid"], entry["phase"]))
    return found


async def test_kill_9_mid_run_reruns_what_was_under_way_and_nothing_else(
        tmp_path: Path, processes: list[RuntimeProcess]) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "triggers.yaml").write_text(BUNDLE)
    record = tmp_path / "record.jsonl"
    env = {"PF_FAULT_RECORD": str(record), "PACKETFLOW_TRIGGER_LEASE_SECONDS": LEASE_SECONDS}
    log = tmp_path / "runtime.log"
    first = RuntimeProcess(bundle, tmp_path / "state", log, env)
    processes.append(first)
    completions = [f"n{n}" for n in range(12)]
    async with RuntimeClient(first.address) as client:
        for n in range(12):
            await client.invoke("source", {"n": n}, timeout=10)
        # Every completion's run has started (its claim is written before): kill them all
        # mid-run, after at least one scheduled run finished.
        await eventually(lambda: all(runs(record).get(e) for e in completions) and any(
            (first.process.pid, "end") in r for e, r in runs(record).items()
            if not e.startswith("n")), timeout=30, what="runs under way")
        first.kill()
    killed = time.time()
    before = runs(record)
    pending = unfinished(tmp_path / "state")
    under_way = {e for e, r in before.items() if (first.process.pid, "end") not in r}
    old_fire_times = sorted(e for e in before if not e.startswith("n"))
    assert set(completions) <= under_way  # each completion sleeps 3 s: none had finished
    # Let a fire time pass while no process runs: the restart must catch it up.
    await eventually(lambda: time.time() > killed + 2.1, timeout=5, what="a missed fire time")
    second = RuntimeProcess(bundle, tmp_path / "state", log, env, address=first.address)
    processes.append(second)
    ready = datetime.now(UTC).isoformat()
    async with RuntimeClient(second.address) as client:
        for n in range(12, 15):
            await client.invoke("source", {"n": n}, timeout=10)
    everything = [*completions, "n12", "n13", "n14"]

    def new_fire_times() -> list[str]:
        return sorted(e for e, r in runs(record).items() if not e.startswith("n")
                      and (second.process.pid, "start") in r)

    await eventually(lambda: all((second.process.pid, "end") in runs(record).get(e, [])
                                 for e in [*everything, *pending])
                     and len(set(new_fire_times()) - set(old_fire_times)) >= 2, timeout=40,
                     what="every event finished after the restart")
    after = runs(record)
    ends = {e: sum(1 for _, phase in r if phase == "end") for e, r in after.items()}
    # A fire time the restarted process started since is still under way: no end yet.
    in_flight = {e for e, r in after.items() if r == [(second.process.pid, "start")]}
    assert in_flight.isdisjoint([*everything, *under_way])
    assert under_way <= pending  # a run under way holds an unfinished claim
    for event, count in ends.items():
        if event not in in_flight:
            # Once, or twice when it finished but its claim was not done at the kill.
            finished_first = (first.process.pid, "end") in after[event]
            assert count == 1 + (finished_first and event in pending), (event, after[event])
    rerun = {e for e, r in after.items()
             if (first.process.pid, "start") in r and (second.process.pid, "start") in r}
    assert rerun == {e for e in pending if (first.process.pid, "start") in before.get(e, [])}
    caught_up = min(set(new_fire_times()) - set(old_fire_times))  # reruns aside
    # The first fire time the restarted process ran was due before it was serving (the one
    # missed while it was down), and later than every fire time the killed one had run.
    assert old_fire_times[-1] < caught_up < ready
    second.stop()
