"""What an actor's handler receives: memory, timers, reminders, tools and calls to
capabilities."""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
from collections.abc import Awaitable
from typing import Any, Protocol, TypeVar

import orjson

from packetflow.actors.active import ActiveActor, TurnEffects
from packetflow.actors.search import Ranker
from packetflow.actors.search import rank as search_rank
from packetflow.actors.store import ActorStore, MemoryEntry, Reminder
from packetflow.actors.timers import ActorTimers
from packetflow.context import CallContext
from packetflow.errors import ContractViolation, FieldViolation
from packetflow.mcp.toolbox import McpToolbox, ToolNotDeclared
from packetflow.spec import DURATION_PATTERN, ActorSpec, duration_seconds

T = TypeVar("T")
_DURATION = re.compile(DURATION_PATTERN)

# How many of the newest entries a search ranks: bounds a turn's cost on a long log.
SEARCH_WINDOW = 2000


class ActorTypeView(Protocol):
    """What a turn's context uses of its actor type (the runtime's ``ActorTypeView``)."""

    name: str
    spec: ActorSpec
    store: ActorStore
    ranker: Ranker
    timers: ActorTimers
    toolbox: McpToolbox | None

    def clock(self) -> float:
        """The runtime's wall clock."""

    async def call_capability(self, name: str, value: dict[str, Any],
                              ctx: ActorContext) -> dict[str, Any]:
        """``ctx.call``: a capability through the engine, within the turn's deadline."""


def seconds_of(value: float | str, what: str) -> float:
    """Seconds from a number or a duration string (``"90s"``, ``"1h"``); names the argument."""
    if isinstance(value, str):
        if not _DURATION.match(value):
            raise ValueError(f"{what}: {value!r} is not a duration like 30s, 5m, 1h")
        seconds = duration_seconds(value)
    else:
        seconds = float(value)
    if seconds <= 0:
        raise ValueError(f"{what} must be positive, got {value!r}")
    return seconds


def stored_data(actor_type: str, value: Any, where: str) -> Any:
    """``value`` as the store will keep it (plain JSON data, copied), or a ContractViolation
    naming ``where``: bad data fails the turn that passed it, not the commit or a reader."""
    if value is None:
        return None
    try:
        return orjson.loads(orjson.dumps(value))
    except TypeError as exc:
        raise ContractViolation(actor_type, [FieldViolation(
            where, f"not JSON-serializable: {exc}")]) from None


def _stored_text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{where} must be a string, got {type(value).__name__}")
    if "\x00" in value:
        raise ValueError(f"{where} must not contain NUL characters")
    return value


class Memory:
    """``ctx.memory``: the actor's append-only log. Appends commit with the turn's state."""

    def __init__(self, actor_type: ActorTypeView, actor: ActiveActor, effects: TurnEffects,
                 ctx: ActorContext) -> None:
        self._type = actor_type
        self._actor = actor
        self._effects = effects
        self._ctx = ctx  # its deadline is read at call time: set after the context is built

    def append(self, text: str, role: str = "note", data: Any = None) -> MemoryEntry:
        """Add an entry (visible to ``recent``/``search`` at once, durable when the turn
        commits)."""
        text = _stored_text(text, "memory.append: text")
        role = _stored_text(role, "memory.append: role")
        data = stored_data(self._type.name, data, "memory.append: data")
        seq = self._actor.memory_seq + len(self._effects.appends) + 1
        entry = MemoryEntry(seq, self._type.clock(), role, text, data)
        self._effects.appends.append(entry)
        return entry

    async def recent(self, limit: int = 10) -> list[MemoryEntry]:
        """The newest ``limit`` entries, oldest first."""
        stored = await self._type.store.memory_recent(self._actor.actor_id, limit)
        return [*stored, *self._effects.appends][-limit:] if limit > 0 else []

    async def search(self, query: str, limit: int = 5) -> list[MemoryEntry]:
        """The entries most relevant to ``query``, best first (embeddings or BM25)."""
        window = min(self._type.spec.memory.max_messages, SEARCH_WINDOW)
        entries = [*await self._type.store.memory_recent(self._actor.actor_id, window),
                   *self._effects.appends]
        order = await search_rank(self._type.ranker, query, [e.text for e in entries], limit,
                                  deadline=self._ctx.deadline)
        return [entries[i] for i in order]


class Reminders:
    """``ctx.reminders``: durable; they survive restarts and reactivate the actor."""

    def __init__(self, actor_type: ActorTypeView, actor: ActiveActor, effects: TurnEffects) -> None:
        self._type = actor_type
        self._actor = actor
        self._effects = effects

    def set(self, name: str, after: float | str, every: float | str | None = None,
            data: Any = None) -> Reminder:
        """Fire handler ``name`` (or ``on_reminder``) ``after`` from now, then ``every``."""
        if not _stored_text(name, "reminders.set: name"):
            raise ValueError("reminders.set: name must not be empty")
        period = None if every is None else seconds_of(every, "reminders.set: every")
        reminder = Reminder(name, self._type.clock() + seconds_of(after, "reminders.set: after"),
                            period, stored_data(self._type.name, data, "reminders.set: data"))
        self._effects.set_reminders[name] = reminder
        self._effects.delete_reminders.discard(name)
        return reminder

    def cancel(self, name: str) -> None:
        """Remove the reminder ``name`` when the turn commits (schedules stay)."""
        self._effects.set_reminders.pop(name, None)
        self._effects.delete_reminders.add(name)

    async def list(self) -> list[Reminder]:
        """The actor's committed reminders and schedules."""
        return await self._type.store.reminders(self._actor.actor_id)


class Timers:
    """``ctx.timers``: in memory only; they stop when the actor deactivates."""

    def __init__(self, actor_type: ActorTypeView, actor: ActiveActor) -> None:
        self._type = actor_type
        self._actor = actor

    def after(self, name: str, delay: float | str, data: Any = None) -> None:
        """Run handler ``name`` (or ``on_timer``) once after ``delay``."""
        self._type.timers.start(self._actor, name, seconds_of(delay, "timers.after: delay"),
                                None, data)

    def every(self, name: str, period: float | str, data: Any = None) -> None:
        """Run handler ``name`` (or ``on_timer``) every ``period`` while the actor is active."""
        seconds = seconds_of(period, "timers.every: period")
        self._type.timers.start(self._actor, name, seconds, seconds, data)

    def cancel(self, name: str) -> None:
        """Stop timer ``name``."""
        self._type.timers.cancel(self._actor, name)

    @property
    def names(self) -> list[str]:
        """The running timers."""
        return sorted(self._actor.timers)


class Tools:
    """``ctx.tools``: the tools the actor type declares in ``mcpTools`` (local capabilities or
    remote MCP tools), called with the turn's trace, caller and deadline."""

    def __init__(self, actor_type: ActorTypeView, ctx: ActorContext) -> None:
        self._type = actor_type
        self._ctx = ctx

    def names(self) -> list[str]:
        """The tool names the actor may call."""
        toolbox = self._type.toolbox
        return toolbox.names() if toolbox is not None else []

    async def call(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        """Call tool ``name`` with ``args`` and return its output object. An undeclared name
        raises ``ToolNotDeclared`` (NOT_FOUND) naming it; nothing runs past the turn's
        deadline."""
        toolbox = self._type.toolbox
        if toolbox is None:
            raise ToolNotDeclared(name, [])
        ctx = self._ctx
        # Read at call time: the turn's deadline is set after the context is built.
        call = CallContext(capability=name, trace_id=ctx.trace_id,
                           caller=f"actor:{ctx.actor_type}/{ctx.actor_id}",
                           deadline=ctx.deadline)
        return await toolbox.call(name, args, call)


class ActorContext:
    """A turn's context: who the actor is, what woke it, and what it may use."""

    def __init__(self, actor_type: ActorTypeView, actor: ActiveActor, *, trace_id: str,
                 caller: str | None, deadline: float | None,
                 trigger: dict[str, Any] | None = None,
                 effects: TurnEffects | None = None) -> None:
        self.actor_type = actor_type.name
        self.actor_id = actor.actor_id
        self.trace_id = trace_id
        self.caller = caller
        self.deadline = deadline
        self.trigger = trigger
        self.is_new = actor.version == 0
        self.effects = TurnEffects() if effects is None else effects
        self.memory = Memory(actor_type, actor, self.effects, self)
        self.reminders = Reminders(actor_type, actor, self.effects)
        self.timers = Timers(actor_type, actor)
        self.tools = Tools(actor_type, self)
        self._type = actor_type
        self._loop = asyncio.get_running_loop()

    def now(self) -> float:
        """The runtime's clock (wall time, injectable in tests)."""
        return self._type.clock()

    async def call(self, capability: str, value: dict[str, Any]) -> dict[str, Any]:
        """Call a capability of this runtime through the engine (same contracts, metrics)."""
        return await self._type.call_capability(capability, value, self)

    def wait(self, awaitable: Awaitable[T]) -> T:
        """From a sync handler (on a worker thread): run an async ``ctx`` method and wait."""
        async def run() -> T:
            return await awaitable

        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(run(),
                                                                               self._loop)
        return future.result()

