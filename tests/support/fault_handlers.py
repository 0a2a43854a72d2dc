"""Handlers for the fault tests and the soak: each run leaves a durable trace in a file.

``record`` appends one JSON line per run to the file named by ``$PF_FAULT_RECORD`` (O_APPEND,
one write per line, fsync'd), so a test can count the runs of each event after the process
that made them was killed.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import orjson

from packetflow.context import CallContext

# ``source`` (whose completions are events) and ``record`` (what a triggered run calls): the
# fault tests' bundles add their triggered compositions after it.
SOURCE_AND_RECORD = """
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: source}
spec:
  intent: Echo a number (its completions are events)
  requires: {n: {type: integer}}
  implementation: {builtin: {name: echo}}
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: record}
spec:
  intent: Record an event in a file
  requires: {event: {type: string}, seconds: {type: number, default: 0}}
  implementation: {python: {module: tests.support.fault_handlers, function: record}}
---
"""


def _append(entry: dict[str, Any]) -> None:
    fd = os.open(os.environ["PF_FAULT_RECORD"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, orjson.dumps(entry) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)


async def record(event: str, ctx: CallContext, seconds: float = 0.0) -> dict[str, Any]:
    """Record that ``event`` started, wait ``seconds``, record that it finished."""
    pid = os.getpid()
    await asyncio.to_thread(_append, {"event": event, "pid": pid, "phase": "start"})
    if seconds:
        await asyncio.sleep(seconds)
    await asyncio.to_thread(_append, {"event": event, "pid": pid, "phase": "end"})
    return {"event": event}


def recorded(path: str) -> list[dict[str, Any]]:
    """The entries ``record`` wrote to ``path`` (none if it does not exist yet)."""
    try:
        with open(path, "rb") as source:
            return [orjson.loads(line) for line in source if line.strip()]
    except FileNotFoundError:
        return []


async def busy(seconds: float, ctx: CallContext) -> dict[str, Any]:
    """Hold a call slot for ``seconds`` (a handler at work), then answer."""
    await asyncio.sleep(seconds)
    return {"slept": seconds}
