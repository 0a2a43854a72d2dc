"""The transport-neutral actor runtime: activation, turns, durability, timers, placement.

One ``ActorType`` per Actor manifest holds that type's store and its active actors; the
``ActorSystem`` holds the types of a runtime process. Servicers only translate to these calls.

Invariants:
- one turn at a time per actor (an ``asyncio.Lock`` per active actor, FIFO);
- a turn's reply is returned only after its state, memory and reminder changes committed;
- every write is fenced by the epoch taken at activation, so a stale owner cannot write;
- read-only views (get, list) read the store and never wait for a turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Coroutine,
    Iterable,
    Mapping,
)
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import orjson
from prometheus_client import CollectorRegistry

from packetflow.actors.active import (
    ACTOR_ID_RE,
    ActiveActor,
    SendResult,
    Turn,
    check_actor_id,
)
from packetflow.actors.context import ActorContext
from packetflow.actors.errors import ActorNotFound, ActorTypeNotFound, FencedOut
from packetflow.actors.handlers import (
    HandlerLoadError,
    HandlerSource,
    call_handler,
    handle_turn,
    load_handlers,
)
from packetflow.actors.metrics import ActorMetrics
from packetflow.actors.placement import Placement
from packetflow.actors.postgres_store import PostgresActorStore
from packetflow.actors.reminders import ReminderFiring
from packetflow.actors.residency import Residency
from packetflow.actors.search import Ranker, ranker_for
from packetflow.actors.sqlite_store import SqliteActorStore
from packetflow.actors.store import ActorRecord, ActorStore, Commit
from packetflow.actors.timers import ActorTimers
from packetflow.context import CallContext
from packetflow.contracts import CompiledContract
from packetflow.errors import (
    Code,
    ContractViolation,
    DeadlineExceeded,
    FieldViolation,
    HandlerFailed,
    InvalidInput,
    PacketFlowError,
    Unavailable,
    code_of,
)
from packetflow.manifests import ManifestError
from packetflow.mcp.toolbox import McpToolbox, ToolboxError
from packetflow.spec import Actor, duration_seconds

if TYPE_CHECKING:
    from packetflow.engine import Engine

log = logging.getLogger("packetflow.actors")

# Applied message ids are kept this long, so a client retrying an unacknowledged message
# gets the first reply instead of a second application.
PROCESSED_TTL_SECONDS = 24 * 3600.0
Clock = Callable[[], float]
T = TypeVar("T")


class Forwarder(Protocol):
    """Reaches the member that owns an actor (gRPC, set by the server)."""

    def send(self, address: str, actor_type: str, actor_id: str, message: dict[str, Any],
             message_id: str | None, trace_id: str, timeout: float | None,
             caller: str | None = None) -> Awaitable[SendResult]:
        """Deliver a message there (it is not forwarded again), on behalf of ``caller``."""

    def delete(self, address: str, actor_type: str, actor_id: str) -> Awaitable[bool]:
        """Delete the actor there (it is not forwarded again)."""

    def followups(self, address: str, actor_type: str,
                  actor_id: str) -> AsyncIterator[dict[str, Any]]:
        """The actor's follow-ups as the member there makes them."""

    def retain(self, addresses: Collection[str]) -> None:
        """Close the channels to every other address (members that left)."""


def _handler_failed(type_name: str, actor_id: str, trace_id: str) -> HandlerFailed:
    log.exception("actor %s/%s handler raised (trace_id=%s)", type_name, actor_id, trace_id)
    return HandlerFailed(f"actor {type_name}/{actor_id} failed; see the runtime log for trace "
                         f"id {trace_id}")


class ActorType:
    """One actor type: its store, handlers, active actors and background loops."""

    def __init__(self, actor: Actor, store: ActorStore, handlers: HandlerSource,
                 system: ActorSystem) -> None:
        self.actor = actor
        self.spec = actor.spec
        self.name = actor.name
        self.store = store
        self.handlers = handlers
        self.system = system
        self.clock = system.clock
        self.metrics = system.metrics
        self.requires = CompiledContract.compile(self.spec.requires)
        self.provides = CompiledContract.compile(self.spec.provides)
        self.initial_state = orjson.dumps(self.spec.initial_state)
        self.idle_seconds = duration_seconds(self.spec.idle_timeout)
        self.retention_seconds = duration_seconds(self.spec.memory.retention)
        self.schedules = [(s.name, duration_seconds(s.every)) for s in self.spec.schedules]
        self.ranker: Ranker = ranker_for(self.spec.memory.semantic_search)
        self.called: set[str] = set()  # capabilities ctx.call reached (undeclared, so observed)
        self.toolbox = build_toolbox(actor, system)
        self.placement: Placement | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._warming = False  # the ranker's model load has been started
        self._turn_metrics: dict[Code, Any] = {}
        self._stopping = False
        self.timers = ActorTimers(self._timer_fired)
        self.residency = Residency(self.spec.max_active, self.idle_seconds, self.timers,
                                   self._notify_idle)
        self.active = self.residency.active  # the same mapping: read by the servicer and MCP
        self.reminders = ReminderFiring(
            self.name, store, self.clock, self._turn, self._owns,
            lambda: self.metrics.reminders_fired.labels(self.name).inc(), system.reminder_poll)
        store.observe = self._observe_store

    def _observe_store(self, operation: str, seconds: float) -> None:
        self.metrics.store.labels(self.name, operation).observe(seconds)

    # ----------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Open the store and start reminders, the idle reaper, the sweep and placement; on
        failure nothing stays open."""
        self.timers.loop = asyncio.get_running_loop()
        await self.store.open()
        try:
            self.metrics.active.labels(self.name).set_function(lambda: len(self.active))
            scaling = self.spec.scaling
            if self.store.shared and (self.spec.replicas > 1 or (
                    scaling is not None and scaling.max_replicas > 1)):
                self.placement = Placement(
                    self.name, self.store, self.system.member_id, self.system.address,
                    self.system.heartbeat_interval, observer=self.system.observer,
                    rebalance=self.rebalance, members_changed=self.system.prune_channels)
                await self.placement.start()
        except BaseException:
            with contextlib.suppress(KeyError):
                self.metrics.active.remove(self.name)
            await self.store.close()
            raise
        self._tasks = [asyncio.create_task(loop()) for loop in (
            self.reminders.run, self._idle_loop, self._sweep_loop)]

    async def stop(self, grace: float = 5.0) -> None:
        """Stop the loops and background turns, let running turns finish (``grace`` seconds
        for all of them together), deactivate all, close."""
        self._stopping = self.reminders.stopping = True  # new turns and firings are refused
        background = [*self._tasks, *self._background, *self.reminders.firing.values()]
        for task in background:
            task.cancel()
        # A loop that died of an error must not stop the shutdown: its error was logged.
        await asyncio.gather(*background, return_exceptions=True)

        async def drain() -> None:
            for actor in list(self.active.values()):
                async with actor.lock:
                    self.residency.retire(actor)

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await drain()
        for actor in list(self.active.values()):
            self.residency.retire(actor)
        if self.placement is not None:
            await self.placement.stop()
        with contextlib.suppress(KeyError):
            self.metrics.active.remove(self.name)
        if self.toolbox is not None:
            await self.toolbox.aclose()
        await self.store.close()

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        if self._stopping:
            coroutine.close()  # stop() already cancelled and awaited the background
            return
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --------------------------------------------------------------------------- sends

    async def send(self, actor_id: str, message: Any, *, message_id: str | None = None,
                   trace_id: str | None = None, caller: str | None = None,
                   deadline: float | None = None, forwarded: bool = False) -> SendResult:
        """Deliver one message; returns the reply once the new state is committed."""
        check_actor_id(actor_id)
        if message_id and not ACTOR_ID_RE.match(message_id):
            raise InvalidInput([FieldViolation("message_id", "must be 1-256 printable "
                                                             "characters")])
        checked, violations = self.requires.check(message, "message")
        if violations:
            raise InvalidInput(violations)
        trace_id = trace_id or os.urandom(16).hex()
        if self.placement is not None and not forwarded:
            address = self.placement.forward_address(actor_id)
            if address is not None:
                try:
                    return await self._forward(address, actor_id, checked, message_id,
                                               trace_id, deadline, caller)
                except Unavailable:
                    # The owner may have left: re-read the members once before giving up.
                    await self.placement.refresh()
                    self.rebalance()
                    retry = self.placement.forward_address(actor_id)
                    if retry == address:
                        raise
                    if retry is not None:
                        return await self._forward(retry, actor_id, checked, message_id,
                                                   trace_id, deadline, caller)
        turn = Turn("message", checked, message_id or None, trace_id=trace_id, caller=caller,
                    deadline=deadline)
        try:
            return await self._turn(actor_id, turn, touch=True)
        except FencedOut:
            # Our lease went stale (another member activated or deleted the actor since): the
            # write was refused, so nothing of the turn happened. Once more, freshly activated.
            return await self._turn(actor_id, turn, touch=True)

    async def _forward(self, address: str, actor_id: str, message: dict[str, Any],
                       message_id: str | None, trace_id: str,
                       deadline: float | None, caller: str | None) -> SendResult:
        loop = asyncio.get_running_loop()
        timeout = None if deadline is None else max(0.0, deadline - loop.time())
        return await self.system.forward(address, self.name, actor_id, message,
                                         message_id or None, trace_id, timeout, caller)

    def _entry(self, actor_id: str, touch: bool) -> ActiveActor:
        if self._stopping:
            raise Unavailable(f"actor type {self.name} is stopping")
        return self.residency.entry(actor_id, touch)

    async def _turn(self, actor_id: str, turn: Turn, touch: bool = False) -> SendResult:
        while True:
            result = await self._turn_on(self._entry(actor_id, touch), turn, touch)
            if result is not None:
                return result
            # passivated while we waited: go again on a fresh entry

    async def _turn_on(self, actor: ActiveActor, turn: Turn,
                       touch: bool = False) -> SendResult | None:
        """One turn on this entry, after the turns queued before it; None when the entry was
        retired meanwhile."""
        actor.pending += 1
        try:
            async with actor.lock:
                if actor.retired:
                    return None
                return await self._measured(actor, turn)
        finally:
            actor.pending -= 1
            if touch:
                actor.last_used = time.monotonic()
                actor.idle_notified = False
            if len(self.active) > self.spec.max_active:
                self.residency.enforce_bound()  # entries created while all were busy

    async def _measured(self, actor: ActiveActor, turn: Turn) -> SendResult:
        started = time.perf_counter()
        code = Code.INTERNAL
        try:
            result = await self._locked_turn(actor, turn)
            code = Code.OK
            return result
        except PacketFlowError as exc:
            code = code_of(exc)
            raise
        except asyncio.CancelledError:
            code = Code.CANCELLED
            raise
        finally:
            child = self._turn_metrics.get(code)
            if child is None:
                child = self._turn_metrics[code] = self.metrics.turns.labels(self.name,
                                                                             code.value)
            child.observe(time.perf_counter() - started)

    async def _activate(self, actor: ActiveActor, trace_id: str, deadline: float) -> None:
        """Take the lease, load the state and run ``on_start`` (within the turn's deadline).
        The entry counts as activated only when all of it succeeded; otherwise (an error, a
        deadline, a cancelled caller) it is retired and the next turn starts afresh."""
        warm = getattr(self.ranker, "warm", None)
        if warm is not None and not self._warming:
            # The embedding model takes seconds to load: start as the first actor activates
            # (not at type start: a process may never search), off the loop, so its search
            # does not spend the turn's deadline on importing torch. A daemon thread, not the
            # loop's executor: a shutdown must not wait for a load nobody needs any more.
            self._warming = True
            threading.Thread(target=warm, name="embeddings-warm", daemon=True).start()
        try:
            activation = await self.store.activate(actor.actor_id, self.system.member_id,
                                                   self.clock(), self.schedules)
            actor.epoch = activation.epoch
            actor.version = activation.version
            actor.memory_seq = activation.memory_seq
            actor.state_json = (self.initial_state if activation.state is None
                                else orjson.dumps(activation.state))
            actor.handler = self.handlers.make()
            on_start = getattr(actor.handler, "on_start", None)
            if callable(on_start):
                ctx = ActorContext(self, actor, trace_id=trace_id, caller=None,
                                   deadline=deadline, trigger={"kind": "start"})
                started = await self._guarded(actor, ctx, lambda: call_handler(on_start, ctx))
                if isinstance(started, dict) and actor.version == 0:
                    actor.state_json = orjson.dumps(started)
                actor.start_effects = ctx.effects
        except BaseException as exc:
            self.residency.retire(actor)
            if isinstance(exc, Exception) and not isinstance(exc, PacketFlowError):
                raise _handler_failed(self.name, actor.actor_id, trace_id) from None
            raise
        actor.activated = True
        self.metrics.activations.labels(self.name).inc()

    async def _locked_turn(self, actor: ActiveActor, turn: Turn) -> SendResult:
        loop = asyncio.get_running_loop()
        limit = loop.time() + self.spec.timeout_seconds
        deadline = limit if turn.deadline is None else min(turn.deadline, limit)
        trace_id = turn.trace_id or os.urandom(8).hex()
        try:
            # Store reads before the handler count against the turn's deadline too: a store
            # that does not answer must not hold the caller (or the actor) past it.
            async with asyncio.timeout_at(deadline):
                if not actor.activated:
                    await self._activate(actor, trace_id, deadline)
                stored = (None if turn.message_id is None else
                          await self.store.processed_reply(actor.actor_id, turn.message_id))
        except TimeoutError:
            raise DeadlineExceeded(f"actor {self.name}/{actor.actor_id}: its store did not "
                                   "answer before the turn's deadline") from None
        if stored is not None:
            return SendResult(orjson.loads(stored), actor.version, duplicate=True)
        # A copy: on_start's effects commit with the first turn that succeeds, and a turn that
        # fails must not leave its own changes behind for the next one.
        effects = None if actor.start_effects is None else actor.start_effects.copy()
        ctx = ActorContext(self, actor, trace_id=trace_id, caller=turn.caller,
                           deadline=deadline, effects=effects,
                           trigger=None if turn.kind == "message" else {
                               "kind": turn.trigger or turn.kind, "name": turn.name,
                               "data": turn.data})
        state = orjson.loads(actor.state_json)
        reply, new_state, followup = await self._guarded(
            actor, ctx, lambda: handle_turn(self.name, self.provides, actor, turn, ctx, state))
        return await self._commit(actor, turn, ctx, reply, new_state, followup)

    async def _guarded(self, actor: ActiveActor, ctx: ActorContext,
                       call: Callable[[], Awaitable[T]]) -> T:
        """Run handler code until ``ctx.deadline``; its errors become domain errors (details
        in the log, not in the reply)."""
        assert ctx.deadline is not None
        timeout = asyncio.timeout_at(ctx.deadline)
        try:
            async with timeout:
                return await call()
        except PacketFlowError:
            raise
        except TimeoutError:
            if timeout.expired():
                raise DeadlineExceeded(f"actor {self.name}/{actor.actor_id}: the turn did not "
                                       "finish before its deadline") from None
            raise _handler_failed(self.name, actor.actor_id, ctx.trace_id) from None
        except Exception:
            raise _handler_failed(self.name, actor.actor_id, ctx.trace_id) from None

    async def _commit(self, actor: ActiveActor, turn: Turn, ctx: ActorContext,
                      reply: dict[str, Any], new_state: Any,
                      followup: dict[str, Any] | None) -> SendResult:
        if not isinstance(new_state, dict):
            raise ContractViolation(self.name, [FieldViolation(
                "state", f"must be an object, got {type(new_state).__name__}")])
        try:
            state_json = orjson.dumps(new_state)
            reply_json = orjson.dumps(reply) if turn.message_id is not None else None
        except TypeError as exc:
            raise ContractViolation(self.name, [FieldViolation(
                "state", f"not JSON-serializable: {exc}")]) from None
        effects = ctx.effects
        commit = Commit(
            actor.actor_id, actor.epoch, state_json, self.clock(),
            actor.memory_seq + len(effects.appends), effects.appends,
            self.spec.memory.max_messages, list(effects.set_reminders.values()),
            sorted(effects.delete_reminders), turn.fired, turn.message_id, reply_json)
        write = asyncio.ensure_future(self._write(actor, commit, followup))
        assert ctx.deadline is not None
        try:
            async with asyncio.timeout_at(ctx.deadline):
                version = await asyncio.shield(write)
        except TimeoutError:
            # A store that does not confirm must not hold the caller past its deadline. The
            # write is cut short, which retires the actor (the next turn reads what the store
            # holds); whether it landed is unknown, so a retry under the same message id
            # applies it at most once.
            write.cancel()
            write.add_done_callback(lambda done: done.cancelled() or done.exception())
            raise DeadlineExceeded(f"actor {self.name}/{actor.actor_id}: its store did not "
                                   "confirm the turn before its deadline") from None
        except asyncio.CancelledError:
            # The write is already on its way: let it land so memory matches the store.
            with contextlib.suppress(Exception):
                await write
            raise
        return SendResult(reply, version)

    async def _write(self, actor: ActiveActor, commit: Commit,
                     followup: dict[str, Any] | None) -> int:
        try:
            version = await self.store.commit(commit)
        except FencedOut:
            log.warning("actor %s/%s fenced out (epoch %d): deactivated here", self.name,
                        actor.actor_id, actor.epoch)
            self.residency.retire(actor)
            raise
        except BaseException:
            # The store may have applied the commit before the failure reached us (a lost
            # connection, a timeout): what is in memory may be stale, so the next turn
            # activates afresh from the store instead of overwriting it.
            self.residency.retire(actor)
            raise
        actor.state_json = commit.state
        actor.version = version
        actor.memory_seq = commit.memory_seq
        actor.start_effects = None
        if followup is not None:
            self.residency.publish(actor.actor_id, followup)
        return version

    # ----------------------------------------------------------------- passivation

    def reap_idle(self, now: float | None = None) -> int:
        """Run ``on_idle`` for, or deactivate, actors idle past ``idleTimeout``; returns how
        many were deactivated."""
        return self.residency.reap_idle(now)

    def _notify_idle(self, actor: ActiveActor) -> bool:
        if not callable(getattr(actor.handler, "on_idle", None)):
            return False
        self._spawn(self._background_turn(actor, Turn("idle", trace_id=os.urandom(8).hex())))
        return True

    async def _background_turn(self, actor: ActiveActor, turn: Turn) -> None:
        """A turn of an active actor nobody waits for (timer, idle): on this entry only, so an
        actor passivated meanwhile is not activated again for it; failures are logged."""
        try:
            await self._turn_on(actor, turn)
        except PacketFlowError as exc:
            log.warning("actor %s/%s %s %r failed: %s", self.name, actor.actor_id,
                        turn.trigger or turn.kind, turn.name, exc)
        except Exception:
            log.exception("actor %s/%s %s %r failed", self.name, actor.actor_id,
                          turn.trigger or turn.kind, turn.name)

    async def _idle_loop(self) -> None:
        interval = min(max(self.idle_seconds / 4, 0.02), 1.0)
        while True:
            await asyncio.sleep(interval)
            try:
                self.reap_idle()
            except Exception:
                log.exception("actor type %s: idle reaper", self.name)

    def _timer_fired(self, actor: ActiveActor, name: str, data: Any) -> None:
        self._spawn(self._background_turn(actor, Turn(
            "trigger", name=name, data=data, trigger="timer", trace_id=os.urandom(8).hex())))

    def _owns(self, actor_id: str) -> bool:
        return self.placement is None or self.placement.owns(actor_id)

    # ----------------------------------------------------------------- memory sweep

    async def sweep(self) -> int:
        """Delete memory older than ``memory.retention``; returns the entries deleted."""
        now = self.clock()
        return await self.store.sweep(now - self.retention_seconds, now - PROCESSED_TTL_SECONDS)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.system.sweep_interval)
            try:
                deleted = await self.sweep()
            except Exception as exc:  # the loop must outlive any error: log and go on
                log.warning("actor type %s: memory sweep: %s", self.name, exc)
                continue
            if deleted:
                log.info("memory sweep", extra={"actor_type": self.name, "deleted": deleted})

    # ------------------------------------------------------------- read-only views

    async def describe(self, actor_id: str, recent: int = 10) -> dict[str, Any]:
        """State, memory summary and reminders, as committed (never waits for a turn)."""
        check_actor_id(actor_id)
        record = await self.store.get(actor_id)
        if record is None:
            raise ActorNotFound(self.name, actor_id)
        entries = await self.store.memory_recent(actor_id, recent)
        reminders = await self.store.reminders(actor_id)
        return {
            "state": record.state,
            "memory": {"count": record.memory_count,
                       "recent": [entry.to_json() for entry in entries]},
            "reminders": [reminder.to_json() for reminder in reminders],
            "version": record.version,
            "epoch": record.epoch,
            "active": actor_id in self.active,
        }

    async def list_actors(self, limit: int = 1000, after: str = "") -> list[ActorRecord]:
        """Stored actors by id, ``limit`` at a time after ``after``."""
        return await self.store.list_actors(limit, after)

    async def delete(self, actor_id: str, forwarded: bool = False) -> bool:
        """Deactivate (after its current turn) and delete an actor's state, memory, reminders;
        with placement, at the member that owns it."""
        check_actor_id(actor_id)
        address = (None if self.placement is None or forwarded
                   else self.placement.forward_address(actor_id))
        if address is not None:
            try:
                return await self.system.forward_delete(address, self.name, actor_id)
            except Unavailable as exc:
                # Deleting here is safe too: the owner's lease goes stale (a new epoch), so its
                # next turn starts afresh from the deleted state.
                log.warning("actor %s/%s: delete at the owner failed (%s); deleting here",
                            self.name, actor_id, exc)
        actor = self.active.get(actor_id)
        if actor is not None:
            async with actor.lock:
                self.residency.retire(actor)
        return await self.store.delete(actor_id)

    # ------------------------------------------------------------ conversations

    def subscribe(self, actor_id: str) -> asyncio.Queue[dict[str, Any]]:
        """A queue of follow-up messages (from ``on_idle``) for an open conversation."""
        return self.residency.subscribe(actor_id)

    def unsubscribe(self, actor_id: str, queue: asyncio.Queue[dict[str, Any]]) -> None:
        """Close a conversation's follow-up queue."""
        self.residency.unsubscribe(actor_id, queue)

    # ---------------------------------------------------------------- placement

    def rebalance(self) -> int:
        """Deactivate idle actors this member no longer owns (membership changed)."""
        if self.placement is None:
            return 0
        return self.residency.rebalance(self.placement.owns)

    async def call_capability(self, name: str, value: dict[str, Any],
                              ctx: ActorContext) -> dict[str, Any]:
        """``ctx.call``: a capability through the engine, within the turn's deadline."""
        call = CallContext(capability=name, trace_id=ctx.trace_id,
                           caller=f"actor:{self.name}/{ctx.actor_id}", deadline=ctx.deadline)
        output = await self.system.invoke(name, value, call)
        self.called.add(name)  # after success: only names that exist (graph's call edges)
        return output


def build_store(actor: Actor, state_dir: Path, environ: Mapping[str, str]) -> ActorStore:
    """The store a manifest declares; errors name the manifest field."""
    store = actor.spec.store
    if store.postgresql is not None:
        dsn = store.postgresql.dsn
        if store.postgresql.dsn_from is not None:
            try:
                dsn = store.postgresql.dsn_from.resolve(environ)
            except KeyError as exc:
                raise HandlerLoadError("spec.store.postgresql.dsnFrom", str(exc.args[0])) from None
        return PostgresActorStore(actor.name, dsn=dsn or "")
    assert store.sqlite is not None
    path = Path(store.sqlite.path) if store.sqlite.path else state_dir / f"{actor.name}.db"
    return SqliteActorStore(actor.name, path=path)


def build_toolbox(actor: Actor, system: ActorSystem) -> McpToolbox | None:
    """``ctx.tools`` of a type: its ``mcpTools``; errors name the manifest field."""
    if not actor.spec.mcp_tools:
        return None
    try:
        return McpToolbox(actor.spec.mcp_tools, system.invoke, system.environ)
    except ToolboxError as exc:
        raise HandlerLoadError(exc.path, exc.message) from None


class ActorSystem:
    """Every actor type of a runtime process."""

    def __init__(self, engine: Engine | None = None, *, state_dir: Path = Path(".packetflow"),
                 metrics: ActorMetrics | None = None, clock: Clock = time.time,
                 member_id: str | None = None, address: str = "127.0.0.1:0",
                 environ: Mapping[str, str] | None = None, reminder_poll: float = 1.0,
                 sweep_interval: float = 60.0, heartbeat_interval: float = 1.0,
                 observer: bool = False) -> None:
        self.engine = engine
        self.state_dir = state_dir
        if metrics is None:
            # On the engine's registry, so /metrics shows actors beside capabilities.
            metrics = ActorMetrics(engine.metrics.registry if engine is not None
                                   else CollectorRegistry(auto_describe=True))
        self.metrics = metrics
        self.clock = clock
        self.member_id = member_id or f"{socket.gethostname()}-{os.getpid()}"
        self.address = address
        self.environ = os.environ if environ is None else environ
        self.reminder_poll = reminder_poll
        self.sweep_interval = sweep_interval
        self.heartbeat_interval = heartbeat_interval
        # No address others can forward to: own no actor while a member is alive.
        self.observer = observer
        self.types: dict[str, ActorType] = {}
        self.forwarder: Forwarder | None = None

    def get(self, name: str) -> ActorType:
        """The served actor type ``name``, or ActorTypeNotFound."""
        actor_type = self.types.get(name)
        if actor_type is None:
            raise ActorTypeNotFound(name)
        return actor_type

    async def replace(self, actors: Iterable[Actor]) -> list[ManifestError]:
        """Serve this set of actor types: unchanged ones keep running, changed ones restart
        (their active actors deactivate; state stays), removed ones stop."""
        wanted = {actor.name: actor for actor in actors}
        errors: list[ManifestError] = []
        # Build the new and changed types first: one that does not load leaves the running
        # version of its type serving (the error is reported).
        built: dict[str, ActorType] = {}
        for name, actor in wanted.items():
            old = self.types.get(name)
            if old is not None and old.actor == actor:
                continue
            try:
                built[name] = ActorType(actor, build_store(actor, self.state_dir, self.environ),
                                        load_handlers(actor.spec), self)
            except HandlerLoadError as exc:
                errors.append(ManifestError(f"actor {name}", exc.path, exc.message))
            except Exception as exc:
                errors.append(ManifestError(f"actor {name}", "spec.store", str(exc)))
        for name, old in list(self.types.items()):
            if name not in wanted or name in built:
                del self.types[name]
                await self._stop(old)
        for name, actor_type in built.items():
            try:
                await actor_type.start()  # leaves nothing open when it fails
            except Exception as exc:  # a corrupt file, a bad DSN, an unreachable server...
                errors.append(ManifestError(f"actor {name}", "spec.store", str(exc)))
                continue
            self.types[name] = actor_type
        self.types = dict(sorted(self.types.items()))
        return errors

    @staticmethod
    async def _stop(actor_type: ActorType) -> None:
        """Stop a type; an error is logged, so the other types still stop and close."""
        try:
            await actor_type.stop()
        except Exception:
            log.exception("actor type %s did not stop cleanly", actor_type.name)

    async def invoke(self, name: str, value: dict[str, Any],
                     ctx: CallContext) -> dict[str, Any]:
        """Run a capability through the engine (same contracts, metrics): in this runtime,
        or on Kubernetes at the Service of that name (``Engine.invoke_routed``)."""
        if self.engine is None:
            raise PacketFlowError("no capabilities are served in this runtime")
        return await self.engine.invoke_routed(name, value, ctx)

    async def forward(self, address: str, actor_type: str, actor_id: str,
                      message: dict[str, Any], message_id: str | None, trace_id: str,
                      timeout: float | None, caller: str | None = None) -> SendResult:
        """Send to the owning member (through the transport's forwarder)."""
        if self.forwarder is None:
            raise PacketFlowError("forwarding is not configured in this runtime")
        return await self.forwarder.send(address, actor_type, actor_id, message, message_id,
                                         trace_id, timeout, caller)

    def prune_channels(self) -> None:
        """Keep forwarding channels only to members some type still has (members leave)."""
        if self.forwarder is not None:
            self.forwarder.retain({address for kind in self.types.values()
                                   if kind.placement is not None
                                   for address in kind.placement.members.values()})

    async def forward_delete(self, address: str, actor_type: str, actor_id: str) -> bool:
        """Delete at the owning member (through the transport's forwarder)."""
        if self.forwarder is None:
            raise PacketFlowError("forwarding is not configured in this runtime")
        return await self.forwarder.delete(address, actor_type, actor_id)

    async def aclose(self) -> None:
        """Stop every type (on shutdown)."""
        types, self.types = list(self.types.values()), {}
        for actor_type in types:
            await self._stop(actor_type)
