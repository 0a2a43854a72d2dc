"""Actor handlers for the actor tests: counting, ordering, slow turns, reminders, follow-ups."""

from __future__ import annotations

import asyncio
from typing import Any

from packetflow.actors import ActorContext
from packetflow.errors import PacketFlowError, code_of

# Tests open gates from their own event loop; ``Slow`` waits on them.
GATES: dict[str, asyncio.Event] = {}


class Ledger:
    """Appends each message's ``n`` to ``applied``: shows order, loss and duplicates."""

    async def on_message(self, message: dict[str, Any], state: dict[str, Any],
                         ctx: ActorContext) -> tuple[dict[str, Any], dict[str, Any]]:
        applied = list(state.get("applied", []))
        await asyncio.sleep(0)  # a suspension inside the turn: ordering must still hold
        applied.append(message["n"])
        if "note" in message:
            ctx.memory.append(message["note"], role="user")
        if "remind_every" in message:
            ctx.reminders.set("tick", message["remind_every"], every=message["remind_every"])
        if "timer_every" in message:
            ctx.timers.every("beat", message["timer_every"])
        if "gate" in message:
            await GATES[message["gate"]].wait()
        if "sleep" in message:
            await asyncio.sleep(message["sleep"])
        if "call" in message:
            called = await ctx.call(message["call"], {"message": "hi"})
            return {"n": message["n"], "called": called}, {**state, "applied": applied}
        if "search" in message:
            found = await ctx.memory.search(message["search"], limit=3)
            return {"n": message["n"], "found": [e.text for e in found]}, {**state,
                                                                         "applied": applied}
        return {"n": message["n"], "count": len(applied)}, {**state, "applied": applied}

    async def tick(self, state: dict[str, Any], ctx: ActorContext) -> dict[str, Any]:
        """Reminder ``tick``: count it."""
        return {**state, "ticks": state.get("ticks", 0) + 1}

    def beat(self, state: dict[str, Any], ctx: ActorContext) -> dict[str, Any]:
        """Timer ``beat`` (sync: runs on a worker thread)."""
        return {**state, "beats": state.get("beats", 0) + 1}

    def on_idle(self, state: dict[str, Any], ctx: ActorContext) -> dict[str, Any] | None:
        """Follow up once when the conversation went quiet."""
        if state.get("applied"):
            return {"text": f"still there? you sent {len(state['applied'])}"}
        return None


def on_message(message: dict[str, Any], state: dict[str, Any],
               ctx: ActorContext) -> tuple[dict[str, Any], dict[str, Any]]:
    """Module-level (sync) handler: counts messages."""
    count = state.get("count", 0) + 1
    return {"count": count}, {**state, "count": count}


class ToolUser:
    """Calls ``ctx.tools``: ``{"tool": name, "args": {...}}`` replies with the tool's output;
    with ``"catch": true`` a failure is the reply (its code and message) instead of failing."""

    async def on_message(self, message: dict[str, Any], state: dict[str, Any],
                         ctx: ActorContext) -> tuple[dict[str, Any], dict[str, Any]]:
        try:
            output = await ctx.tools.call(message["tool"], message.get("args", {}))
        except PacketFlowError as exc:
            if not message.get("catch"):
                raise
            return {"error": code_of(exc).value, "message": exc.message}, state
        calls = state.get("calls", 0) + 1
        return {"output": output, "tools": ctx.tools.names()}, {**state, "calls": calls}


class Fragile:
    """For robustness tests: ``on_start`` appends to memory (waiting on gate ``start`` when
    one is set); a message appends ``turn {q}``, then ``fail`` raises, ``bad_data`` appends
    data the store cannot hold, ``remind`` sets reminder ``slow_tick`` (waits on gate
    ``slow_tick``) or ``tick``."""

    starts = 0

    async def on_start(self, ctx: ActorContext) -> dict[str, Any]:
        Fragile.starts += 1
        if "start" in GATES:
            await GATES["start"].wait()
        ctx.memory.append("started")
        return {"ready": True}

    async def on_message(self, message: dict[str, Any], state: dict[str, Any],
                         ctx: ActorContext) -> tuple[dict[str, Any], dict[str, Any]]:
        ctx.memory.append(f"turn {message.get('q', '')}")
        if message.get("fail"):
            raise RuntimeError("fails after appending")
        if message.get("bad_data"):
            ctx.memory.append("bad", data={1, 2})
        if "remind" in message:
            ctx.reminders.set(message["remind"], message.get("after", 1))
        return {"ok": True}, state

    async def tick(self, state: dict[str, Any], ctx: ActorContext) -> dict[str, Any]:
        """Reminder ``tick``: count it."""
        return {**state, "ticks": state.get("ticks", 0) + 1}

    async def slow_tick(self, state: dict[str, Any], ctx: ActorContext) -> dict[str, Any]:
        """Reminder ``slow_tick``: waits on gate ``slow_tick``, then counts."""
        await GATES["slow_tick"].wait()
        return {**state, "slow_ticks": state.get("slow_ticks", 0) + 1}


class SyncTimers:
    """Plain ``def`` handlers (worker threads) using ``ctx.timers``."""

    def on_message(self, message: dict[str, Any], state: dict[str, Any],
                   ctx: ActorContext) -> tuple[dict[str, Any], dict[str, Any]]:
        ctx.timers.every("beat", "50ms")
        return {"timers": ctx.timers.names}, state

    def beat(self, state: dict[str, Any], ctx: ActorContext) -> dict[str, Any]:
        """Timer ``beat``: count it."""
        return {**state, "beats": state.get("beats", 0) + 1}
