"""Durable reminders and schedules of one actor type: found due in the store, fired as turns.

Each due reminder fires in a task of its own (a slow one holds up no other), at most
``max_firing`` at once; the loop pages through the backlog, so reminders still firing or
another member's to fire cannot hide later ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from packetflow.actors.active import SendResult, Turn
from packetflow.actors.errors import FencedOut, ReminderMoved
from packetflow.actors.store import ActorStore
from packetflow.actors.timing import next_due
from packetflow.errors import PacketFlowError

log = logging.getLogger("packetflow.actors")

DUE_PAGE = 256
MAX_FIRING = 1024


class ReminderFiring:
    """Fires an actor type's due reminders through ``run_turn``."""

    def __init__(self, type_name: str, store: ActorStore, clock: Callable[[], float],
                 run_turn: Callable[[str, Turn], Awaitable[SendResult]],
                 owns: Callable[[str], bool], fired: Callable[[], None], poll: float) -> None:
        self.type_name = type_name
        self.store = store
        self.clock = clock
        self.run_turn = run_turn
        self.owns = owns  # whether this member fires the actor's reminders
        self.on_fired = fired
        self.poll = poll
        self.due_page = DUE_PAGE  # due reminders read at a time
        self.max_firing = MAX_FIRING  # reminders firing at once
        self.stopping = False
        self.firing: dict[tuple[str, str], asyncio.Task[int]] = {}
        self._wake = asyncio.Event()  # a reminder finished firing: look for more at once

    async def fire_due(self, wait: bool = True) -> int:
        """Fire the reminders due now that this member owns; returns how many fired, or with
        ``wait=False`` how many started."""
        now = self.clock()
        started: list[asyncio.Task[int]] = []
        cursor = None
        while not self.stopping and len(self.firing) < self.max_firing:
            page = await self.store.due(now, self.due_page, cursor)
            for due in page:
                key = (due.actor_id, due.reminder.name)
                if key in self.firing or not self.owns(due.actor_id):
                    continue  # still firing; or another member's to fire
                if self.stopping or len(self.firing) >= self.max_firing:
                    break
                task = asyncio.create_task(self.fire(due.actor_id, due.reminder, now))
                self.firing[key] = task
                task.add_done_callback(functools.partial(self._done, key))
                started.append(task)
            if len(page) < self.due_page:
                break
            cursor = page[-1].cursor
        if not wait:
            return len(started)
        return sum(await asyncio.gather(*started))

    def _done(self, key: tuple[str, str], _task: asyncio.Task[int]) -> None:
        self.firing.pop(key, None)
        self._wake.set()

    async def fire(self, actor_id: str, reminder: Any, now: float) -> int:
        """Fire one due reminder as a turn; 1 when this call fired it, 0 when another did."""
        following = (None if reminder.period is None
                     else next_due(reminder.due_at, reminder.period, now))
        fired = (reminder.name, reminder.due_at, following)
        turn = Turn("trigger", name=reminder.name, data=reminder.data, trigger=reminder.kind,
                    fired=fired, trace_id=os.urandom(8).hex())
        try:
            await self.run_turn(actor_id, turn)
        except (FencedOut, ReminderMoved):
            return 0  # another member owns the actor now, or already handled this slot
        except Exception as exc:
            log.warning("actor %s/%s reminder %r failed: %s; moving it on", self.type_name,
                        actor_id, reminder.name, exc,
                        exc_info=not isinstance(exc, PacketFlowError))
            try:
                # Straight in the store: no activation, and conditional on the slot.
                if not await self.store.advance(actor_id, fired):
                    return 0
            except PacketFlowError:
                return 0
        self.on_fired()
        return 1

    async def run(self) -> None:
        """Fire due reminders until cancelled, waking for the next due time or a finished one."""
        while True:
            self._wake.clear()
            started = 0
            try:
                started = await self.fire_due(wait=False)
                upcoming = await self.store.next_due()
            except Exception as exc:  # the loop must outlive any error: log and go on
                log.warning("actor type %s: reminders: %s", self.type_name, exc)
                upcoming = None
            now = self.clock()
            if upcoming is None or (upcoming <= now and not started):
                # Nothing due, or only reminders being fired or other members' to fire: wait
                # a poll (or until one of ours finishes) instead of spinning on them.
                wait = self.poll
            else:
                wait = min(self.poll, max(upcoming - now, 0.01))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()
