"""Actors: durable turns vs bare SQLite commits, throughput, latency at a fixed rate, memory.

Figures (one JSON line):
- ``durable_turn_ratio``: one actor, sequential messages, each turn committing a 1 KiB state
  (SQLite, WAL, synchronous=FULL) / bare SQLite commits of the same rows with the same pragmas,
  measured in alternating pairs in the same run (median ratio with min/max and the pairs'
  variation; runs lengthen until one pair varies by under 10%; target >= 0.5).
- ``messages_per_s_10k_actors_64_concurrent``: 64 senders, ids drawn from 10,000 actors
  (activation included, maxActive 10,000), through the in-process actor runtime.
- ``fixed_rate_p50/p90/p99_ms``: open-loop sends at 500 messages/s over gRPC (client and server
  in this process), to 1,000 actors; latency from scheduled send to reply.
- ``rss_kib_per_10k_passivated``: resident memory growth after 10,000 actors were activated
  and passivated again (maxActive 100): what idle ids cost a process (should be ~0).
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from bench.common import median, percentile, ratio_figures, rounded, steady_pairs
from packetflow.actors import ActorContext, ActorSystem
from packetflow.actors.sqlite_store import connect_sqlite
from packetflow.client import RuntimeClient
from packetflow.engine import Engine
from packetflow.server import RuntimeServer
from packetflow.spec import Actor

STATE_BYTES = 1024
SEQUENTIAL_TURNS = 400
PAIRS = 9
DURABLE_BUDGET_S = 90.0
CONCURRENCY = 64
ACTORS = 10_000
RATE = 500.0
RATE_SECONDS = 4.0


class Keeper:
    """The bench's actor: replaces its 1 KiB state with the message's payload."""

    async def on_message(self, message: dict[str, Any], state: dict[str, Any],
                         ctx: ActorContext) -> tuple[dict[str, Any], dict[str, Any]]:
        """Reply with the turn number; the new state is the payload."""
        turns = state.get("turns", 0) + 1
        return {"turns": turns}, {"turns": turns, "blob": message["blob"]}


def _manifest(max_active: int = ACTORS) -> Actor:
    return Actor.model_validate({
        "apiVersion": "packetflow.io/v1alpha1", "kind": "Actor", "metadata": {"name": "keeper"},
        "spec": {"intent": "bench", "implementation": {"python": {"module": "bench.actors",
                                                                  "class": "Keeper"}},
                 "maxActive": max_active}})


def _blob(n: int) -> str:
    return (f"{n:08d}" * (STATE_BYTES // 8))[:STATE_BYTES - 40]


def bare_commits(conn: sqlite3.Connection, rows: int) -> float:
    """Commits/s of the same row writes straight to SQLite (same pragmas, one per commit)."""
    started = time.perf_counter()
    for n in range(rows):
        state = orjson.dumps({"turns": n, "blob": _blob(n)})
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("UPDATE t SET v = ?, version = version + 1 WHERE k = 'a'", (state,))
        conn.execute("COMMIT")
    return rows / (time.perf_counter() - started)


async def actor_turns(system: ActorSystem, turns: int) -> float:
    """Turns/s of one actor receiving sequential messages."""
    kind = system.get("keeper")
    started = time.perf_counter()
    for n in range(turns):
        await kind.send("one", {"blob": _blob(n)})
    return turns / (time.perf_counter() - started)


async def durable_turn_ratio(directory: Path) -> dict[str, Any]:
    """Alternate bare and actor runs, both on a warmed database file that stays open; the
    median of the pairs' ratios, runs lengthened until one pair varies by under 10%."""
    system = ActorSystem(state_dir=directory / "turns")
    await system.replace([_manifest()])
    conn = connect_sqlite(directory / "bare.db")
    conn.execute("CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, v BLOB, version INT)")
    conn.execute("INSERT OR REPLACE INTO t VALUES ('a', x'', 0)")
    await actor_turns(system, 100)  # warm up: activation, code paths, the files
    await asyncio.to_thread(bare_commits, conn, 100)

    async def pair(scale: float) -> tuple[float, float]:
        rows = int(SEQUENTIAL_TURNS * scale)
        return (await asyncio.to_thread(bare_commits, conn, rows),
                await actor_turns(system, rows))

    found = await steady_pairs(pair, pairs=PAIRS, budget_s=DURABLE_BUDGET_S)
    conn.close()
    await system.aclose()
    return {**ratio_figures("durable_turn_ratio", found.ratios),
            "durable_turns_per_pair_run": int(SEQUENTIAL_TURNS * found.scale),
            "bare_sqlite_commits_per_s": rounded(median(found.baseline), 1),
            "durable_turns_per_s": rounded(median(found.subject), 1)}


async def many_actors(directory: Path) -> dict[str, Any]:
    """64 concurrent senders over 10,000 actor ids."""
    system = ActorSystem(state_dir=directory / "many")
    await system.replace([_manifest()])
    kind = system.get("keeper")
    rng = random.Random(7)
    messages = 3 * ACTORS
    ids = [f"actor-{rng.randrange(ACTORS)}" for _ in range(messages)]
    payload = {"blob": "x" * 100}

    async def sender(worker: int) -> None:
        for index in range(worker, messages, CONCURRENCY):
            await kind.send(ids[index], payload)

    started = time.perf_counter()
    await asyncio.gather(*(sender(w) for w in range(CONCURRENCY)))
    elapsed = time.perf_counter() - started
    await system.aclose()
    return {"messages_per_s_10k_actors_64_concurrent": rounded(messages / elapsed, 1)}


async def fixed_rate(directory: Path) -> dict[str, Any]:
    """Open-loop sends at RATE over gRPC; latency measured from the scheduled send time."""
    engine = Engine()
    system = ActorSystem(engine, state_dir=directory / "rate")
    await system.replace([_manifest()])
    server = await RuntimeServer.start(engine, "127.0.0.1:0", system)
    latencies: list[float] = []
    async with RuntimeClient(f"127.0.0.1:{server.port}") as client:
        for n in range(200):  # warm up the channel and activate the actors
            await client.send("keeper", f"actor-{n % 1000}", {"blob": "x"})
        loop = asyncio.get_running_loop()
        total = int(RATE * RATE_SECONDS)
        begin = loop.time() + 0.05
        pending = []

        async def one(n: int, due: float) -> None:
            await client.send("keeper", f"actor-{n % 1000}", {"blob": "x" * 100})
            latencies.append(loop.time() - due)

        for n in range(total):
            due = begin + n / RATE
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            pending.append(asyncio.create_task(one(n, due)))
        await asyncio.gather(*pending)
    await server.stop(0)
    await system.aclose()
    return {f"fixed_rate_{name}_ms": rounded(percentile(latencies, q) * 1e3)
            for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))}


def _rss_kib() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


async def passivated_memory(directory: Path) -> dict[str, Any]:
    """RSS growth over activating and passivating 10,000 actors (after a warm-up round)."""
    system = ActorSystem(state_dir=directory / "memory")
    await system.replace([_manifest(max_active=100)])
    kind = system.get("keeper")

    async def touch(prefix: str) -> None:
        for start in range(0, ACTORS, 500):
            await asyncio.gather(*(kind.send(f"{prefix}-{i}", {"blob": "x"})
                                   for i in range(start, start + 500)))

    await touch("warm")  # allocator pools, caches and code paths settle first
    gc.collect()
    before = _rss_kib()
    await touch("measured")
    gc.collect()
    after = _rss_kib()
    await system.aclose()
    return {"rss_kib_per_10k_passivated": after - before, "active_after": len(kind.active)}


async def measure() -> dict[str, Any]:
    """Every figure of the bench."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-actors-") as tmp:
        directory = Path(tmp)
        figures = await durable_turn_ratio(directory)
        figures.update(await many_actors(directory))
        figures.update(await fixed_rate(directory))
        figures.update(await passivated_memory(directory))
    figures.update({"state_bytes": STATE_BYTES, "sqlite_synchronous": "FULL",
                    "seconds": rounded(time.perf_counter() - started, 1)})
    return figures


def run() -> dict[str, Any]:
    """The bench's figures."""
    return asyncio.run(measure())


if __name__ == "__main__":
    print(orjson.dumps(run()).decode())
