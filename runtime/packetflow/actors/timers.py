"""``ctx.timers`` underneath: in-memory timers of active actors, armed on the type's loop.

A sync handler runs on a worker thread, so arming and disarming hop onto the loop; a timer
that fires asks for a background turn, and every timer stops when its actor deactivates.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from packetflow.actors.active import ActiveActor

# Called on the loop when a timer fires: (actor, timer name, its data).
Fire = Callable[[ActiveActor, str, Any], None]


class ActorTimers:
    """The timers of one actor type's active actors."""

    def __init__(self, fire: Fire) -> None:
        self._fire = fire
        self.loop: asyncio.AbstractEventLoop | None = None  # set when the type starts

    def start(self, actor: ActiveActor, name: str, delay: float, period: float | None,
              data: Any) -> None:
        """Arm timer ``name`` of an active actor (from the loop or a sync handler)."""
        self._on_loop(lambda: self._arm(actor, name, delay, period, data))

    def cancel(self, actor: ActiveActor, name: str) -> None:
        """Disarm a timer (from the loop or a sync handler)."""
        self._on_loop(lambda: self._disarm(actor, name))

    @staticmethod
    def stop_all(actor: ActiveActor) -> None:
        """Disarm every timer of an actor that deactivates (on the loop)."""
        for handle in actor.timers.values():
            handle.cancel()
        actor.timers.clear()

    def _on_loop(self, function: Callable[[], None]) -> None:
        """Run ``function`` on the type's event loop: at once when called on it, else (a sync
        handler on a worker thread) through the loop's queue, waiting until it ran."""
        loop = self.loop
        assert loop is not None, "the actor type is not started"
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            function()
            return

        async def run() -> None:
            function()

        asyncio.run_coroutine_threadsafe(run(), loop).result()

    def _arm(self, actor: ActiveActor, name: str, delay: float, period: float | None,
             data: Any) -> None:
        self._disarm(actor, name)
        if actor.retired:
            return  # deactivated while its handler still ran: timers stop with the actor
        assert self.loop is not None
        actor.timers[name] = self.loop.call_later(delay, self._fired, actor, name, period, data)

    @staticmethod
    def _disarm(actor: ActiveActor, name: str) -> None:
        handle = actor.timers.pop(name, None)
        if handle is not None:
            handle.cancel()

    def _fired(self, actor: ActiveActor, name: str, period: float | None, data: Any) -> None:
        actor.timers.pop(name, None)
        if actor.retired:
            return
        if period is not None:
            self._arm(actor, name, period, period, data)
        self._fire(actor, name, data)
