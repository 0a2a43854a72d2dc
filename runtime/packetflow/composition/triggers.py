"""Event-driven compositions (``triggers``, the issue's ``on``): cron and completion events.

Delivery is at-least-once: a failed run with a retryable code is delivered again. Each event
has an idempotency key (by default its ``id``; a schedule's id is its fire time), claimed in an
``IdempotencyStore`` before the run, so a duplicate event does not run twice.

A durable store keeps the event with its claim, as a lease the running process renews: when
the process dies mid-run, the lease runs out and a runner (the restarted process, or another
replica on the shared store) takes the event over and runs it again. Each schedule's last fire
time is kept too, so a restarted process runs the latest fire time it missed, once.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

import jmespath
import orjson

from packetflow.composition.cron import Cron
from packetflow.composition.model import Trigger
from packetflow.context import CallContext
from packetflow.databases import Database, PostgresDatabase, SqliteDatabase
from packetflow.errors import Code, PacketFlowError, Unavailable, code_of

log = logging.getLogger("packetflow.composition.triggers")

Invoke = Callable[[str, dict[str, Any], CallContext], Awaitable[dict[str, Any]]]
RETRYABLE = frozenset({Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED, Code.RESOURCE_EXHAUSTED})
T = TypeVar("T")
LEASE_SECONDS = 30.0
# How long an event waits for an unreachable store (in memory) before it is dropped.
STORE_WAIT_SECONDS = 300.0
TAKEOVER_PAGE = 64


# ----------------------------------------------------------------------------- idempotency

@dataclass(frozen=True)
class Claimed:
    """An event whose claim this runner took over (its previous holder's lease ran out)."""

    key: str
    target: str
    event: dict[str, Any]
    claims: int  # how many times it was claimed, this one included


class IdempotencyStore(Protocol):
    """Remembers which event keys ran. Async: a durable store does I/O off the event loop;
    one that cannot be reached raises ``Unavailable``."""

    async def claim(self, key: str, target: str = "", event: Any = None) -> bool:
        """Reserve ``key`` (keeping ``target`` and ``event`` for a takeover); False if it is
        done or another delivery holds it."""

    async def renew(self, keys: Collection[str]) -> None:
        """Extend the leases of the claims whose runs are under way here."""

    async def complete(self, key: str) -> None:
        """Mark ``key`` done: later duplicates are dropped."""

    async def release(self, key: str) -> None:
        """Give ``key`` up after a failed run, so a redelivery may run it."""

    async def abandon(self, key: str) -> None:
        """Hand a claim back unfinished (shutdown): the next takeover runs it at once."""

    async def take_expired(self, limit: int) -> list[Claimed]:
        """Claim events whose holder's lease ran out (it died), at most ``limit``."""

    async def last_fired(self, schedule: str) -> float | None:
        """When ``schedule`` last fired (a POSIX time), or None."""

    async def fired(self, schedule: str, at: float) -> None:
        """Remember that ``schedule`` fired at ``at`` (later times win)."""

    async def aclose(self) -> None:
        """Release what the store holds."""


class MemoryIdempotencyStore:
    """In-process store remembering the most recent ``capacity`` completed keys (nothing
    survives the process, so there is nothing to take over)."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self.done: OrderedDict[str, None] = OrderedDict()
        self.running: set[str] = set()
        self.schedules: dict[str, float] = {}

    async def claim(self, key: str, target: str = "", event: Any = None) -> bool:
        """Reserve ``key``; False if it is done or running."""
        if key in self.done or key in self.running:
            return False
        self.running.add(key)
        return True

    async def renew(self, keys: Collection[str]) -> None:
        """Nothing expires here."""

    async def complete(self, key: str) -> None:
        """Mark ``key`` done, forgetting the oldest keys beyond capacity."""
        self.running.discard(key)
        self.done[key] = None
        while len(self.done) > self.capacity:
            self.done.popitem(last=False)

    async def release(self, key: str) -> None:
        """Let a later delivery of ``key`` run."""
        self.running.discard(key)

    async def abandon(self, key: str) -> None:
        """As :meth:`release`: nothing outlives the process."""
        self.running.discard(key)

    async def take_expired(self, limit: int) -> list[Claimed]:
        """No claim outlives its process here."""
        return []

    async def last_fired(self, schedule: str) -> float | None:
        """When ``schedule`` last fired in this process."""
        return self.schedules.get(schedule)

    async def fired(self, schedule: str, at: float) -> None:
        """Remember the fire time."""
        self.schedules[schedule] = max(at, self.schedules.get(schedule, at))

    async def aclose(self) -> None:
        """Nothing to release."""


SCHEMA = (
    "CREATE TABLE IF NOT EXISTS pf_trigger_claims (key TEXT PRIMARY KEY, done INTEGER NOT NULL,"
    " until DOUBLE PRECISION NOT NULL, target TEXT NOT NULL, event TEXT, claims INTEGER NOT"
    " NULL)",
    "CREATE INDEX IF NOT EXISTS pf_trigger_claims_until ON pf_trigger_claims (done, until)",
    "CREATE TABLE IF NOT EXISTS pf_trigger_schedules (name TEXT PRIMARY KEY, fired_at DOUBLE"
    " PRECISION NOT NULL)",
)


class SqlIdempotencyStore:
    """Keys (with their events, as leases) and schedules' fire times in a SQL
    :class:`Database`: SQLite under the state dir, or a PostgreSQL every replica shares (an
    event, a schedule's fire time or a completion, then runs once across the cluster).

    A claim is a lease of ``lease_seconds``, renewed while its run is under way; when the
    process dies mid-run, :meth:`take_expired` hands the event to another runner after the
    lease ran out (at-least-once). Done keys are kept ``keep_seconds``.
    """

    def __init__(self, database: Database, *, lease_seconds: float = LEASE_SECONDS,
                 keep_seconds: float = 7 * 86400.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.database = database
        self.lease_seconds = lease_seconds
        self.keep_seconds = keep_seconds
        self.clock = clock

    async def claim(self, key: str, target: str = "", event: Any = None) -> bool:
        """Reserve ``key`` unless it is done or another delivery's lease on it is live."""
        now = self.clock()
        await self.database.run("DELETE FROM pf_trigger_claims WHERE done = 1 AND until < ?",
                                now)
        taken = await self.database.run(
            "INSERT INTO pf_trigger_claims (key, done, until, target, event, claims) VALUES "
            "(?, 0, ?, ?, ?, 1) ON CONFLICT (key) DO UPDATE SET until = excluded.until, "
            "target = excluded.target, event = excluded.event, "
            "claims = pf_trigger_claims.claims + 1 "
            "WHERE pf_trigger_claims.done = 0 AND pf_trigger_claims.until < ? RETURNING key",
            key, now + self.lease_seconds, target,
            None if event is None else orjson.dumps(event).decode(), now)
        return bool(taken)

    async def renew(self, keys: Collection[str]) -> None:
        """Extend the leases of ``keys``."""
        until = self.clock() + self.lease_seconds
        for key in keys:
            await self.database.run("UPDATE pf_trigger_claims SET until = ? WHERE key = ? AND "
                                    "done = 0", until, key)

    async def complete(self, key: str) -> None:
        """Mark ``key`` done; duplicates within ``keep_seconds`` are dropped."""
        await self.database.run("UPDATE pf_trigger_claims SET done = 1, until = ?, event = NULL"
                                " WHERE key = ?", self.clock() + self.keep_seconds, key)

    async def release(self, key: str) -> None:
        """Drop the claim on ``key`` so a redelivery may run it."""
        await self.database.run("DELETE FROM pf_trigger_claims WHERE key = ? AND done = 0", key)

    async def abandon(self, key: str) -> None:
        """End the lease on ``key`` now, keeping its event for the next takeover."""
        await self.database.run("UPDATE pf_trigger_claims SET until = 0 WHERE key = ? AND "
                                "done = 0", key)

    async def take_expired(self, limit: int) -> list[Claimed]:
        """Claim up to ``limit`` events whose lease ran out (one taker each, even when
        several replicas look at once: the update re-checks the lease)."""
        now = self.clock()
        rows = await self.database.run(
            "UPDATE pf_trigger_claims SET until = ?, claims = claims + 1 WHERE done = 0 AND "
            "until < ? AND event IS NOT NULL AND key IN (SELECT key FROM pf_trigger_claims "
            "WHERE done = 0 AND until < ? AND event IS NOT NULL LIMIT ?) "
            "RETURNING key, target, event, claims",
            now + self.lease_seconds, now, now, limit)
        return [Claimed(str(key), str(target), orjson.loads(event), int(claims))
                for key, target, event, claims in rows]

    async def last_fired(self, schedule: str) -> float | None:
        """When ``schedule`` last fired, or None."""
        rows = await self.database.run("SELECT fired_at FROM pf_trigger_schedules WHERE "
                                       "name = ?", schedule)
        return float(rows[0][0]) if rows else None

    async def fired(self, schedule: str, at: float) -> None:
        """Remember a fire time (an earlier one never replaces a later one)."""
        await self.database.run(
            "INSERT INTO pf_trigger_schedules (name, fired_at) VALUES (?, ?) ON CONFLICT (name)"
            " DO UPDATE SET fired_at = excluded.fired_at WHERE "
            "pf_trigger_schedules.fired_at < excluded.fired_at", schedule, at)

    async def aclose(self) -> None:
        """Finish pending statements, then close the database."""
        await self.database.aclose()


class SqliteIdempotencyStore(SqlIdempotencyStore):
    """Durable keys in SQLite: they survive a restart, so a redelivered event still runs once
    and a run cut short by a crash is taken over."""

    def __init__(self, path: Path | str, **options: Any) -> None:
        super().__init__(SqliteDatabase(path, SCHEMA, "trigger-keys"), **options)


class PostgresIdempotencyStore(SqlIdempotencyStore):
    """Keys in a PostgreSQL database every replica shares; open with :meth:`connect`."""

    @classmethod
    async def connect(cls, dsn: str, **options: Any) -> PostgresIdempotencyStore:
        """Connect and create the tables if needed."""
        return cls(await PostgresDatabase.connect(dsn, SCHEMA, "the trigger store"), **options)


# ----------------------------------------------------------------------------- runner

@dataclass(frozen=True)
class Subscription:
    """A capability to run when a trigger fires."""

    target: str
    trigger: Trigger

    @property
    def schedule_name(self) -> str:
        """The name a schedule's fire times are remembered under."""
        return f"{self.target} {self.trigger.schedule}"


class TriggerRunner:
    """Runs capabilities on their ``triggers``, at least once and at most once per key."""

    def __init__(self, invoke: Invoke, subscriptions: Mapping[str, list[Trigger]],
                 store: IdempotencyStore | None = None, *, max_deliveries: int = 5,
                 redelivery_seconds: float = 0.5, store_wait_seconds: float = STORE_WAIT_SECONDS,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC),
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.invoke = invoke
        self.store: IdempotencyStore = store or MemoryIdempotencyStore()
        self.subscriptions: list[Subscription] = []
        self.watched: frozenset[str] = frozenset()
        self.max_deliveries = max_deliveries
        self.redelivery_seconds = redelivery_seconds
        self.store_wait_seconds = store_wait_seconds
        self.now = now
        self.sleep = sleep  # waits out a redelivery delay (tests inject one)
        self.tasks: set[asyncio.Task[Any]] = set()
        self.schedules: asyncio.Task[None] | None = None
        self.upkeep: asyncio.Task[None] | None = None
        self.running: set[str] = set()  # keys whose runs are under way here
        self.store_down = False
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
            self.schedules = asyncio.get_running_loop().create_task(self.run_schedules())

    def start(self) -> None:
        """Start firing scheduled triggers, renewing leases and taking over the events of
        runners that died, in the background."""
        loop = asyncio.get_running_loop()
        self.schedules = loop.create_task(self.run_schedules())
        self.upkeep = loop.create_task(self._upkeep())

    async def _stored(self, operation: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``operation`` on the store, tried again while the store is unreachable (for up to
        ``store_wait_seconds``; the event waits in memory meanwhile)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.store_wait_seconds
        pause = 0.1
        while True:
            try:
                result = await operation(*args)
            except Unavailable as exc:
                if not self.store_down:
                    self.store_down = True
                    log.warning("trigger store unreachable, events wait: %s", exc.message)
                if loop.time() + pause > deadline:
                    raise
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)
                continue
            if self.store_down:
                self.store_down = False
                log.warning("trigger store reachable again")
            return result

    async def deliver(self, target: str, event: dict[str, Any],
                      trigger: Trigger | None = None) -> bool:
        """Run ``target`` with ``event`` unless its key already ran; True if it ran now."""
        key = _key(event, trigger)
        if not await self._stored(self.store.claim, key, target, event):
            log.info("duplicate event %s for %s dropped", key, target)
            return False
        return await self._run(key, target, event)

    async def _run(self, key: str, target: str, event: dict[str, Any]) -> bool:
        """Run a claimed event, redelivering on retryable codes; then complete or release."""
        self.running.add(key)
        try:
            for delivery in range(1, self.max_deliveries + 1):
                ctx = CallContext(capability=target, trace_id=uuid.uuid4().hex,
                                  caller=f"trigger:{event.get('type', 'event')}")
                try:
                    await self.invoke(target, event, ctx)
                except PacketFlowError as exc:
                    if code_of(exc) in RETRYABLE and delivery < self.max_deliveries:
                        await self.sleep(self.redelivery_seconds * 2 ** (delivery - 1))
                        continue
                    await self._stored(self.store.release, key)
                    log.warning("event %s for %s failed: %s", key, target, exc.message)
                    raise
                except BaseException:
                    # Shielded: a cancelled delivery (shutdown) hands its claim back, so the
                    # next takeover (after a restart, or another replica) runs it.
                    await asyncio.shield(self.store.abandon(key))
                    raise
                await self._stored(self.store.complete, key)
                return True
            raise AssertionError("unreachable: the last delivery returns or raises")
        finally:
            self.running.discard(key)

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
        scheduled = [sub for sub in self.subscriptions if sub.trigger.schedule is not None]
        tasks = [asyncio.create_task(self._fire_schedule(sub)) for sub in scheduled]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _fire_schedule(self, sub: Subscription) -> None:
        """One schedule: each fire time claimed, then run; fire times missed (the process was
        down, or the store unreachable) are caught up once, with the latest of them."""
        assert sub.trigger.schedule is not None
        cron = Cron.parse(sub.trigger.schedule)
        name = sub.schedule_name
        last = await self._stored(self.store.last_fired, name)
        now = self.now()
        fire_at = (cron.latest_between(datetime.fromtimestamp(last, UTC), now)
                   if last is not None else None) or cron.next_after(now)
        while True:
            wait = (fire_at - self.now()).total_seconds()
            if wait > 0:
                await asyncio.sleep(wait)
            stamp = fire_at.isoformat()
            event = {"type": "schedule", "id": f"schedule:{sub.target}:{stamp}",
                     "schedule": sub.trigger.schedule, "scheduledAt": stamp,
                     "firedAt": self.now().isoformat()}
            key = _key(event, sub.trigger)
            try:
                # Claimed before the fire time is remembered: a crash in between runs it
                # again after the restart, and the claim drops the duplicate.
                if await self._stored(self.store.claim, key, sub.target, event):
                    self._spawn(self._run(key, sub.target, event))
                at = fire_at.timestamp()
                await self._stored(self.store.fired, name, at)
            except Unavailable as exc:
                log.warning("scheduled event %s for %s dropped: %s", key, sub.target,
                            exc.message)
            following = cron.next_after(fire_at)
            fire_at = cron.latest_between(fire_at, self.now()) or following

    async def _upkeep(self) -> None:
        """Renew the leases of runs under way; take over events whose runner died."""
        lease = getattr(self.store, "lease_seconds", LEASE_SECONDS)
        while True:
            try:
                if self.running:
                    await self.store.renew(list(self.running))
                for claimed in await self.store.take_expired(TAKEOVER_PAGE):
                    if claimed.key not in self.running:
                        self._spawn(self._take_over(claimed))
            except Unavailable as exc:
                log.debug("trigger upkeep: %s", exc.message)
            except Exception:  # the loop must outlive any error: log and go on
                log.exception("trigger upkeep failed")
            await asyncio.sleep(lease / 3)

    async def _take_over(self, claimed: Claimed) -> bool:
        """Run an event whose runner died mid-run (again: at least once)."""
        if claimed.claims > self.max_deliveries:
            # Its runs keep dying with their process: give it up rather than loop forever.
            log.warning("event %s for %s dropped after %d interrupted runs", claimed.key,
                        claimed.target, claimed.claims - 1)
            await self._stored(self.store.complete, claimed.key)
            return False
        log.warning("event %s for %s taken over from a runner that stopped", claimed.key,
                    claimed.target)
        return await self._run(claimed.key, claimed.target, claimed.event)

    def _spawn(self, delivery: Awaitable[bool]) -> None:
        task: asyncio.Task[bool] = asyncio.ensure_future(delivery)
        self.tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("triggered run failed: %s", task.exception())

    async def close(self) -> None:
        """Stop the schedules and the upkeep, cancel deliveries in flight (their claims are
        handed back for the next takeover), close the store."""
        for background in (self.schedules, self.upkeep):
            if background is not None:
                self.tasks.add(background)
        self.schedules = self.upkeep = None
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
