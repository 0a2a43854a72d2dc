"""Python handlers that misbehave on purpose, for the runtime's error-path tests."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel

from packetflow.context import CallContext

# Tests create gates in their own event loop; `hold` waits on them.
GATES: dict[str, asyncio.Event] = {}
CANCELLED: list[str] = []
STARTED: list[str] = []


async def hold(gate: str, ctx: CallContext) -> dict[str, Any]:
    """Wait until the test opens ``gate``; record a cancellation if it comes first."""
    STARTED.append(ctx.trace_id)
    try:
        await GATES[gate].wait()
    except asyncio.CancelledError:
        CANCELLED.append(ctx.trace_id)
        raise
    return {"gate": gate}


def breaks_contract(**_: Any) -> dict[str, Any]:
    """Returns a field its contract does not provide and omits the one it does."""
    return {"unexpected": True}


def raises(**_: Any) -> dict[str, Any]:
    """Fails with a message that must never reach the caller."""
    raise RuntimeError("database password is hunter2")


async def progress(steps: int, ctx: CallContext) -> dict[str, Any]:
    """Reports ``steps`` progress events, then returns."""
    for step in range(steps):
        ctx.progress(f"step {step + 1} of {steps}", (step + 1) / steps)
        await asyncio.sleep(0)
    return {"steps": steps}


class Order(BaseModel):
    """A typed input."""

    item: str
    quantity: int


def price(order: Order) -> dict[str, Any]:
    """Takes a pydantic model, returns a plain dict."""
    return {"total": order.quantity * 3, "item": order.item}


def whoami(ctx: CallContext) -> dict[str, Any]:
    """Reports what the context carried across the wire."""
    return {"caller": ctx.caller, "trace_id": ctx.trace_id,
            "has_deadline": ctx.deadline is not None, "effects": list(ctx.effects)}


async def nap(seconds: float) -> dict[str, Any]:
    """Sleeps ``seconds`` (for calls that must still be running at some moment, in another
    process where a test cannot open a gate)."""
    await asyncio.sleep(seconds)
    return {"slept": seconds}
