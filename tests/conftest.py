"""Shared fixtures: a real runtime on 127.0.0.1 port 0 and a client bound to it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from packetflow.actors import ActorSystem
from packetflow.client import RuntimeClient
from packetflow.engine import Engine
from packetflow.server import RuntimeServer
from tests.support.actors import SystemFactory
from tests.support.manifests import sample_capabilities

# The `processes` fixture (real runtime processes), and `cluster` and `kube` (the Kubernetes
# emulator), registered before any test imports them.
pytest_plugins = ["tests.support.processes", "tests.support.kube"]


async def eventually(check: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0,
                     what: str = "condition") -> None:
    """Poll ``check`` until it is true or fail after ``timeout`` seconds (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def open_sockets() -> int:
    """Sockets this process holds now (from /proc/self/fd)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed since listed
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


@pytest.fixture
async def runtime() -> AsyncIterator[RuntimeServer]:
    """The sample capabilities served by a real grpc.aio server on an ephemeral port."""
    server = await RuntimeServer.start(Engine(sample_capabilities(), max_payload_bytes=64 * 1024),
                                       "127.0.0.1:0")
    try:
        yield server
    finally:
        await server.stop(grace=0)


@pytest.fixture
async def client(runtime: RuntimeServer) -> AsyncIterator[RuntimeClient]:
    """A client with one channel to the runtime fixture."""
    async with RuntimeClient(f"127.0.0.1:{runtime.port}", caller="tests") as c:
        yield c


@pytest.fixture
async def systems(tmp_path: Path) -> AsyncIterator[SystemFactory]:
    """Make actor systems over ``tmp_path``; all are closed at the end."""
    made: list[ActorSystem] = []

    def make(**options: Any) -> ActorSystem:
        options.setdefault("state_dir", tmp_path)
        options.setdefault("reminder_poll", 0.02)
        system = ActorSystem(**options)
        made.append(system)
        return system

    yield make
    for system in made:
        await system.aclose()
