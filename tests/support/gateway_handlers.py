"""Capability handlers behind the gateway's tests: each backend process gets its behaviour
from its environment, so the same bundle runs as a fast, slow, stalling or failing backend.

* ``PF_GW_NAME``: the backend's name, returned as ``backend`` (who answered).
* ``PF_GW_DELAY``: seconds every ``slow`` call takes.
* ``PF_GW_STALL``: seconds a call whose message starts with ``stall`` takes.
* ``PF_GW_FAIL``: set: ``unavailable`` fails with UNAVAILABLE.
* ``PF_GW_RECORD``: a file ``record`` appends each message to (its side effect) before a
  message starting with ``fail`` fails with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from packetflow.context import CallContext
from packetflow.errors import Unavailable


def _answer(message: str) -> dict[str, Any]:
    return {"message": message, "backend": os.environ.get("PF_GW_NAME", "")}


async def _stall(message: str) -> None:
    stall = float(os.environ.get("PF_GW_STALL", "0"))
    if stall and message.startswith("stall"):
        await asyncio.sleep(stall)


async def whoami(message: str) -> dict[str, Any]:
    """Echo, naming the backend."""
    return _answer(message)


async def slow(message: str) -> dict[str, Any]:
    """Echo after ``PF_GW_DELAY`` seconds."""
    await asyncio.sleep(float(os.environ.get("PF_GW_DELAY", "0")))
    return _answer(message)


async def stall(message: str) -> dict[str, Any]:
    """Echo; ``stall...`` messages wait ``PF_GW_STALL`` seconds first."""
    await _stall(message)
    return _answer(message)


def unavailable(message: str) -> dict[str, Any]:
    """UNAVAILABLE where ``PF_GW_FAIL`` is set."""
    if os.environ.get("PF_GW_FAIL"):
        raise Unavailable(f"{os.environ.get('PF_GW_NAME')} is failing on purpose")
    return _answer(message)


def _append(path: Path, line: str) -> None:
    with path.open("a") as log:
        log.write(line)


async def record(message: str, ctx: CallContext) -> dict[str, Any]:
    """A side effect (a line in ``PF_GW_RECORD``), then maybe a stall or a failure."""
    line = f"{message} {ctx.idempotency_key or '-'}\n"
    await asyncio.to_thread(_append, Path(os.environ["PF_GW_RECORD"]), line)
    await _stall(message)
    if message.startswith("fail"):
        raise Unavailable("failed after the side effect")
    return _answer(message)
