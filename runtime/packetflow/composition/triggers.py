"""Event-driven compositions (``triggers``, the issue's ``on``): cron and completion events.

Delivery is at-least-once: a failed run with a retryable code is delivered again. Each event
has an idempotency key (by default its ``id``; a schedule's id is its fire time), claimed in an
``IdempotencyStore`` before the run, so a duplicate event does not run twice.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import jmespath

from packetflow.composition.cron import Cron
from packetflow.composition.model import Trigger
from packetflow.context import CallContext
from packetflow.errors import Code, PacketFlowError, code_of

log = logging.getLogger("packetflow.composition.triggers")

Invoke = Callable[[str, dict[str, Any], CallContext], Awaitable[dict[str, Any]]]
RETRYABLE = frozenset({Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED, Code.RESOURCE_EXHAUSTED})


# ----------------------------------------------------------------------------- idempotency

class IdempotencyStore(Protocol):
    """Remembers which event keys ran. Async: a durable store does I/O off the event loop."""

    async def claim(self, key: str) -> bool:
        """Reserve ``key``; False if it is done or another delivery holds it."""

    async def complete(self, key: str) -> None:
        """Mark ``key`` done: later duplicates are dropped."""

    async def release(self, key: str) -> None:
        """Give ``key`` up after a failed run, so a redelivery may run it."""

    async def aclose(self) -> None:
        """Release what the store holds."""


class MemoryIdempotencyStore:
    """In-process store remembering the most recent ``capacity`` completed keys."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self.done: OrderedDict[str, None] = OrderedDict()
        self.running: set[str] = set()

    async def claim(self, key: str) -> bool:
        """Reserve ``key``; False if it is done or running."""
        if key in self.done or key in self.running:
            return False
        self.running.add(key)
        return True

    async def complete(self, key: str) -> None:
        """Mark ``key`` done, forgetting the oldest keys beyond capacity."""
        self.running.discard(key)
        self.done[key] = None
        while len(self.done) > self.capacity:
            self.done.popitem(last=False)

    async def release(self, key: str) -> None:
        """Let a later delivery of ``key`` run."""
        self.running.discard(key)

    async def aclose(self) -> None:
        """Nothing to release."""


class SqliteIdempotencyStore:
    """Durable store: keys survive a restart, so a redelivered event still runs once.

    A claim is a lease: when the process dies mid-run its key is not lost, a delivery after
    ``lease_seconds`` takes it over (at-least-once). Done keys are kept ``keep_seconds``.
    Statements run on one worker thread: off the event loop, and one at a time.
    """

    def __init__(self, path: Path | str, *, lease_seconds: float = 300.0,
                 keep_seconds: float = 7 * 86400.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.lease_seconds = lease_seconds
        self.keep_seconds = keep_seconds
        self.clock = clock
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trigger-keys")
        # Autocommit, one statement per change; used only from the worker thread.
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS trigger_events (key TEXT PRIMARY KEY, "
                        "done INTEGER NOT NULL, until REAL NOT NULL)")
        self.db.execute("CREATE INDEX IF NOT EXISTS trigger_events_until "
                        "ON trigger_events (done, until)")

    async def _run(self, sql: str, *args: Any) -> int:
        def execute() -> int:
            return self.db.execute(sql, args).rowcount

        return await asyncio.get_running_loop().run_in_executor(self.worker, execute)

    async def claim(self, key: str) -> bool:
        """Reserve ``key`` unless it is done or another delivery's lease on it is live."""
        now = self.clock()
        await self._run("DELETE FROM trigger_events WHERE done = 1 AND until < ?", now)
        taken = await self._run(
            "INSERT INTO trigger_events (key, done, until) VALUES (?, 0, ?) "
            "ON CONFLICT (key) DO UPDATE SET until = excluded.until "
            "WHERE trigger_events.done = 0 AND trigger_events.until < ?",
            key, now + self.lease_seconds, now)
        return taken == 1

    async def complete(self, key: str) -> None:
        """Mark ``key`` done; duplicates within ``keep_seconds`` are dropped."""
        await self._run("UPDATE trigger_events SET done = 1, until = ? WHERE key = ?",
                        self.clock() + self.keep_seconds, key)

    async def release(self, key: str) -> None:
        """Drop the claim on ``key`` so a redelivery may run it."""
        await self._run("DELETE FROM trigger_events WHERE key = ? AND done = 0", key)

    async def aclose(self) -> None:
        """Finish pending statements, then close the database."""
        await asyncio.get_running_loop().run_in_executor(self.worker, self.db.close)
        self.worker.shutdown(wait=True)


class PostgresIdempotencyStore:
    """Keys in a PostgreSQL database every replica shares: an event (a schedule's fire time,
    a completion) then runs once across the cluster, not once per pod.

    Same lease semantics as :class:`SqliteIdempotencyStore`; open with :meth:`connect`.
    """

    def __init__(self, connection: Any, *, lease_seconds: float = 300.0,
                 keep_seconds: float = 7 * 86400.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.connection = connection  # psycopg.AsyncConnection, autocommit
        self.lease_seconds = lease_seconds
        self.keep_seconds = keep_seconds
        self.clock = clock

    @classmethod
    async def connect(cls, dsn: str, **options: Any) -> PostgresIdempotencyStore:
        """Connect and create the table if needed."""
        import psycopg  # only runtimes configured for a shared store load the driver

        connection = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        await connection.execute(
            "CREATE TABLE IF NOT EXISTS pf_trigger_events (key TEXT PRIMARY KEY, "
            "done BOOLEAN NOT NULL, until DOUBLE PRECISION NOT NULL)")
        return cls(connection, **options)

    async def _run(self, sql: str, *args: Any) -> int:
        cursor = await self.connection.execute(sql, args)
        return int(cursor.rowcount)

    async def claim(self, key: str) -> bool:
        """Reserve ``key`` unless it is done or another delivery's lease on it is live."""
        now = self.clock()
        await self._run("DELETE FROM pf_trigger_events WHERE done AND until < %s", now)
        taken = await self._run(
            "INSERT INTO pf_trigger_events (key, done, until) VALUES (%s, false, %s) "
            "ON CONFLICT (key) DO UPDATE SET until = excluded.until "
            "WHERE NOT pf_trigger_events.done AND pf_trigger_events.until < %s",
            key, now + self.lease_seconds, now)
        return taken == 1

    async def complete(self, key: str) -> None:
        """Mark ``key`` done; duplicates within ``keep_seconds`` are dropped."""
        await self._run("UPDATE pf_trigger_events SET done = true, until = %s WHERE key = %s",
                        self.clock() + self.keep_seconds, key)

    async def release(self, key: str) -> None:
        """Drop the claim on ``key`` so a redelivery may run it."""
        await self._run("DELETE FROM pf_trigger_events WHERE key = %s AND NOT done", key)

    async def aclose(self) -> None:
        """Close the connection."""
        await self.connection.close()


# ----------------------------------------------------------------------------- runner

@dataclass(frozen=True)
class Subscription:
    """A capability to run when a trigger fires."""

    target: str
    trigger: Trigger


class TriggerRunner:
    """Runs capabilities on their ``triggers``, at least once and at most once per key."""

    def __init__(self, invoke: Invoke, subscriptions: Mapping[str, list[Trigger]],
                 store: IdempotencyStore | None = None, *, max_deliveries: int = 5,
                 redelivery_seconds: float = 0.5,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC),
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.invoke = invoke
        self.store: IdempotencyStore = store or MemoryIdempotencyStore()
        self.subscriptions: list[Subscription] = []
        self.watched: frozenset[str] = frozenset()
        self.max_deliveries = max_deliveries
        self.redelivery_seconds = redelivery_seconds
        self.now = now
        self.sleep = sleep  # waits out a redelivery delay (tests inject one)
        self.tasks: set[asyncio.Task[Any]] = set()
        self.schedules: asyncio.Task[None] | None = None
        self.update(subscriptions)

    def update(self, subscriptions: Mapping[str, list[Trigger]]) -> None:
        """Swap the subscriptions (reload); running schedules restart on the new set."""
        self.subscriptions = [Subscription(target, trigger)
                              for target, triggers in subscriptions.items()
                              for trigger in triggers]
        # The capabilities whose completion someone waits for: the engine's cheap check.
        self.watched = frozenset(sub.trigger.completed.capability for sub in self.subscriptions
                                 if sub.trigger.completed is not None)
        if self.schedules is not None:
            self.schedules.cancel()
            self.start()

    def start(self) -> None:
        """Start firing scheduled triggers in the background."""
        self.schedules = asyncio.get_running_loop().create_task(self.run_schedules())

    async def deliver(self, target: str, event: dict[str, Any],
                      trigger: Trigger | None = None) -> bool:
        """Run ``target`` with ``event`` unless its key already ran; True if it ran now."""
        key = _key(event, trigger)
        if not await self.store.claim(key):
            log.info("duplicate event %s for %s dropped", key, target)
            return False
        for delivery in range(1, self.max_deliveries + 1):
            ctx = CallContext(capability=target, trace_id=uuid.uuid4().hex,
                              caller=f"trigger:{event.get('type', 'event')}")
            try:
                await self.invoke(target, event, ctx)
            except PacketFlowError as exc:
                if code_of(exc) in RETRYABLE and delivery < self.max_deliveries:
                    await self.sleep(self.redelivery_seconds * 2 ** (delivery - 1))
                    continue
                await self.store.release(key)
                log.warning("event %s for %s failed: %s", key, target, exc.message)
                raise
            except BaseException:
                # Shielded: a cancelled delivery must still give its claim up.
                await asyncio.shield(self.store.release(key))
                raise
            await self.store.complete(key)
            return True
        raise AssertionError("unreachable: the last delivery returns or raises")

    def completed(self, capability: str, value: Any, code: Code,
                  output: dict[str, Any] | None, trace_id: str, call_id: str) -> None:
        """Engine hook: a call of ``capability`` ended; fire subscribed triggers (no wait).

        The event's id is the call's own ``call_id``, not its trace id: the calls of one
        trace (a composition's steps, a caller's retries) are distinct events.
        """
        outcome = "success" if code == Code.OK else "failure"
        for sub in self.subscriptions:
            done = sub.trigger.completed
            if done is None or done.capability != capability or sub.target == capability:
                continue
            if done.outcome not in ("any", outcome):
                continue
            event = {"type": "completed", "id": f"completed:{capability}:{call_id}",
                     "capability": capability, "outcome": outcome, "code": code.value,
                     "input": value, "output": output, "traceId": trace_id}
            self._spawn(self.deliver(sub.target, event, sub.trigger))

    async def run_schedules(self) -> None:
        """Fire scheduled triggers forever (cancel to stop)."""
        scheduled = [(sub, Cron.parse(sub.trigger.schedule)) for sub in self.subscriptions
                     if sub.trigger.schedule is not None]
        if not scheduled:
            return
        upcoming = {index: cron.next_after(self.now()) for index, (_, cron) in
                    enumerate(scheduled)}
        while True:
            index = min(upcoming, key=lambda i: upcoming[i])
            fire_at = upcoming[index]
            wait = (fire_at - self.now()).total_seconds()
            if wait > 0:
                await asyncio.sleep(wait)
            sub, cron = scheduled[index]
            stamp = fire_at.isoformat()
            event = {"type": "schedule", "id": f"schedule:{sub.target}:{stamp}",
                     "schedule": sub.trigger.schedule, "scheduledAt": stamp,
                     "firedAt": self.now().isoformat()}
            self._spawn(self.deliver(sub.target, event, sub.trigger))
            upcoming[index] = cron.next_after(fire_at)

    def _spawn(self, delivery: Awaitable[bool]) -> None:
        task: asyncio.Task[bool] = asyncio.ensure_future(delivery)
        self.tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("triggered run failed: %s", task.exception())

    async def close(self) -> None:
        """Stop the schedules and cancel deliveries in flight (their keys are released)."""
        if self.schedules is not None:
            self.tasks.add(self.schedules)
            self.schedules = None
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.store.aclose()


def _key(event: dict[str, Any], trigger: Trigger | None) -> str:
    if trigger is not None and trigger.idempotency_key is not None:
        found = jmespath.search(trigger.idempotency_key, event)
        if found is not None:
            return str(found)
    return str(event.get("id") or uuid.uuid4().hex)
