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
