"""Which actors of a type are held in memory: least recently used first, bounded by
``maxActive``, passivated when idle or moved; their state always stays in the store.

An actor is passivatable only when nothing waits on it: no turn running or queued, no open
conversation. Busy actors are kept even past the bound, and passivated once they are done.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from packetflow.actors.active import ActiveActor
from packetflow.actors.timers import ActorTimers


class Residency:
    """The active actors of one type and the open conversations on them."""

    def __init__(self, max_active: int, idle_seconds: float, timers: ActorTimers,
                 notify_idle: Callable[[ActiveActor], bool]) -> None:
        self.max_active = max_active
        self.idle_seconds = idle_seconds
        self.timers = timers
        # Starts the actor's ``on_idle`` turn; False when its handler has none.
        self.notify_idle = notify_idle
        self.active: OrderedDict[str, ActiveActor] = OrderedDict()
        self.streams: dict[str, set[asyncio.Queue[dict[str, Any]]]] = {}

    def entry(self, actor_id: str, touch: bool) -> ActiveActor:
        """The actor's entry, made (and the bound enforced) if it is not active; ``touch``
        makes it the most recently used."""
        actor = self.active.get(actor_id)
        if actor is None:
            actor = self.active[actor_id] = ActiveActor(actor_id)
            self.enforce_bound()
        elif touch:
            self.active.move_to_end(actor_id)
        return actor

    def retire(self, actor: ActiveActor) -> None:
        """Deactivate: drop from memory and stop timers (state stays in the store)."""
        actor.retired = True
        if self.active.get(actor.actor_id) is actor:
            del self.active[actor.actor_id]
        self.timers.stop_all(actor)

    def passivatable(self, actor: ActiveActor) -> bool:
        """Nothing waits on the actor: no turn running or queued, no open conversation."""
        return not (actor.pending or actor.lock.locked() or self.streams.get(actor.actor_id))

    def enforce_bound(self) -> None:
        """Passivate least recently used actors beyond ``maxActive`` (busy ones are kept)."""
        excess = len(self.active) - self.max_active
        if excess <= 0:
            return
        victims: list[ActiveActor] = []
        for actor in self.active.values():
            if len(victims) >= excess:
                break
            if self.passivatable(actor) and actor.activated:
                victims.append(actor)
        for actor in victims:
            self.retire(actor)

    def reap_idle(self, now: float | None = None) -> int:
        """Run ``on_idle`` for, or deactivate, actors idle past ``idleTimeout``; returns how
        many were deactivated."""
        now = time.monotonic() if now is None else now
        expired = []
        for actor in self.active.values():
            if actor.last_used + self.idle_seconds > now:
                break
            expired.append(actor)
        retired = 0
        for actor in expired:
            if not self.passivatable(actor) and not self.streams.get(actor.actor_id):
                continue
            if actor.activated and not actor.idle_notified and self.notify_idle(actor):
                actor.idle_notified = True
                continue
            if self.passivatable(actor):
                self.retire(actor)
                retired += 1
        return retired

    def rebalance(self, owns: Callable[[str], bool]) -> int:
        """Deactivate idle actors this member no longer ``owns`` (membership changed)."""
        moved = [a for a in self.active.values()
                 if not owns(a.actor_id) and self.passivatable(a)]
        for actor in moved:
            self.retire(actor)
        return len(moved)

    def subscribe(self, actor_id: str) -> asyncio.Queue[dict[str, Any]]:
        """A queue of follow-up messages (from ``on_idle``) for an open conversation."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.streams.setdefault(actor_id, set()).add(queue)
        return queue

    def unsubscribe(self, actor_id: str, queue: asyncio.Queue[dict[str, Any]]) -> None:
        """Close a conversation's follow-up queue."""
        queues = self.streams.get(actor_id)
        if queues is not None:
            queues.discard(queue)
            if not queues:
                del self.streams[actor_id]

    def publish(self, actor_id: str, followup: dict[str, Any]) -> None:
        """Hand a committed follow-up to every open conversation on the actor."""
        for queue in self.streams.get(actor_id, ()):
            queue.put_nowait(followup)
