"""Network faults (tests.support.faultproxy) between a runtime and what it depends on: a
remote composition step (another runtime process), a remote MCP server and PostgreSQL (an
actor's store). Each fault in turn on all three: calls end within their deadline with the
right code (never INTERNAL or UNKNOWN, never a hang), service comes back by itself when the
network heals, and after the faulted calls the runtime holds no more tasks, file descriptors
or threads than before.

The runtime under test is served in this process (so its tasks can be counted); the proxies
run on a thread of their own, and their sockets are left out of the count, as are what
pytest's log capture keeps and the remote tool's MCP session (closed before each count). CI makes
``CALLS_PER_FAULT`` calls per path and fault (a few hundred in all, seconds each);
``PACKETFLOW_FAULTS_PROFILE=long`` makes more than 1,000.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from packetflow.actors import ActorSystem
from packetflow.client import CallError, RuntimeClient
from packetflow.engine import Engine
from packetflow.mcp.remote import RemoteMcpTool
from packetflow.serve import load_runtime
from packetflow.server import RuntimeServer
from packetflow.settings import RuntimeSettings
from tests.conftest import eventually
from tests.support.faultproxy import Fault, ProxyThread
from tests.support.ledger_load import LedgerLoad
from tests.support.mcp_remote_server import remote_server
from tests.support.processes import RuntimeProcess

pytest_plugins = ["tests.support.postgres"]

LONG = os.environ.get("PACKETFLOW_FAULTS_PROFILE") == "long"
CALLS_PER_FAULT = 72 if LONG else 16  # per path: 3 paths x 5 faults x 16 = 240 in CI
PARALLEL = 8
TIMEOUT_SECONDS = 1  # each capability's (and the actor's) own deadline
CLIENT_TIMEOUT = 20.0  # the caller's: far beyond the runtime's, so a hang shows as one
FAULTS = [Fault.latency(0.01), Fault.stall(), Fault.half_open(), Fault.reset(), Fault.drop(7)]
NETWORK_CODES = {"OK", "DEADLINE_EXCEEDED", "UNAVAILABLE"}
RECOVERY_SECONDS = 60.0  # keepalives notice a half-open connection in seconds; loaded machine
# What may be held beyond the warm-up's once the faulted calls' background work has ended (a
# statement given up is cancelled at the server for up to 10 s): nothing. Counted with the
# MCP session closed (its HTTP pool keeps as many connections as calls happened to overlap),
# every other pool (the store's slots, the step's channel) is back at its warm-up size; CI
# and long runs measured before == after exactly, within seconds.
SLACK = (0, 0, 0)  # tasks, fds, threads

REMOTE = """
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: echo}
spec:
  intent: Echo a number
  requires: {n: {type: integer}}
  implementation: {builtin: {name: echo}}
"""


def bundle(step: str, mcp: str) -> str:
    """The runtime under test: a composition with a remote step, a remote MCP tool as a
    capability, and an actor whose store is PostgreSQL (its DSN through a proxy)."""
    return f"""
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {{name: remote-step}}
spec:
  intent: Echo a number through a remote runtime
  requires: {{n: {{type: integer}}}}
  timeoutSeconds: {TIMEOUT_SECONDS}
  implementation:
    composition:
      steps:
        - call: {{capability: echo, address: "{step}"}}
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {{name: remote-tool}}
spec:
  intent: The remote MCP server's echo tool
  timeoutSeconds: {TIMEOUT_SECONDS}
  implementation: {{mcp: {{url: "http://{mcp}/mcp", tool: echo}}}}
---
apiVersion: packetflow.io/v1alpha1
kind: Actor
metadata: {{name: ledger}}
spec:
  intent: Record numbers
  timeoutSeconds: {TIMEOUT_SECONDS}
  implementation: {{python: {{module: tests.support.actor_handlers, class: Ledger}}}}
  store: {{postgresql: {{dsnFrom: {{env: PF_FAULTS_DSN}}}}}}
"""


class Served:
    """The runtime under test, in this process."""

    def __init__(self, engine: Engine, actors: ActorSystem, server: RuntimeServer) -> None:
        self.engine, self.actors, self.server = engine, actors, server

    @property
    def address(self) -> str:
        """Where it listens."""
        return f"127.0.0.1:{self.server.port}"

    async def aclose(self) -> None:
        """Stop serving and close what it holds."""
        await self.server.stop(grace=0)
        await self.actors.aclose()
        await self.engine.aclose()


@pytest.fixture
def proxies() -> Iterator[list[ProxyThread]]:
    """Proxies made by the test, closed at the end."""
    made: list[ProxyThread] = []
    yield made
    for proxy in made:
        proxy.close()


@pytest.fixture
async def served(tmp_path: Path, processes: list[RuntimeProcess], postgres_dsn: str,
                 proxies: list[ProxyThread], monkeypatch: pytest.MonkeyPatch,
                 ) -> AsyncIterator[Served]:
    """The three dependencies, each behind a proxy, and the runtime that uses them."""
    (tmp_path / "remote").mkdir()
    (tmp_path / "remote" / "echo.yaml").write_text(REMOTE)
    remote = RuntimeProcess(tmp_path / "remote", tmp_path / "remote-state",
                            tmp_path / "remote.log")
    processes.append(remote)
    host_port = postgres_dsn.split("host=")[1].split()[0] + ":" + \
        postgres_dsn.split("port=")[1].split()[0]
    async with remote_server() as (url, _):
        mcp_host_port = url.split("//")[1].split("/")[0]
        step, mcp, store = (ProxyThread(upstream) for upstream in (
            remote.address, mcp_host_port, host_port))
        proxies.extend([step, mcp, store])
        host, port = store.address.split(":")
        monkeypatch.setenv("PF_FAULTS_DSN", postgres_dsn.replace(
            f"port={host_port.split(':')[1]}", f"port={port}").replace(
            "host=127.0.0.1", f"host={host}"))
        (tmp_path / "bundle").mkdir()
        (tmp_path / "bundle" / "runtime.yaml").write_text(bundle(step.address, mcp.address))
        settings = RuntimeSettings(state_dir=tmp_path / "state", metrics_address="")
        engine, actors, errors = await load_runtime([tmp_path / "bundle"], settings)
        assert not errors, errors
        server = await RuntimeServer.start(engine, "127.0.0.1:0", actors)
        runtime = Served(engine, actors, server)
        try:
            yield runtime
        finally:
            await runtime.aclose()


def held(proxies: list[ProxyThread]) -> tuple[int, int, int]:
    """(asyncio tasks, file descriptors, OS threads) of this process, the proxies' aside, and
    not what pytest keeps (see :func:`drop_what_pytest_keeps`)."""
    drop_what_pytest_keeps()
    fds = len(os.listdir("/proc/self/fd")) - sum(proxy.sockets for proxy in proxies)
    return len(asyncio.all_tasks()), fds, len(os.listdir("/proc/self/task"))


def drop_what_pytest_keeps() -> None:
    """pytest keeps every log record of a test, and a record its arguments: psycopg logs a
    failed cancellation with the exception as one, whose traceback holds the cancellation's
    connection, socket open (a runtime's log handlers let go of it). Keep each record's text
    only, then collect reference cycles (garbage, not a leak)."""
    for handler in logging.getLogger().handlers:
        for record in getattr(handler, "records", ()):
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.msg, record.args, record.exc_info = record.getMessage(), None, None
    gc.collect()


async def close_mcp_session(served: Served) -> None:
    """Close the remote tool's MCP session (the next call reconnects), so its HTTP pool holds
    nothing when file descriptors are counted."""
    tool = served.engine.get("remote-tool").handler
    assert isinstance(tool, RemoteMcpTool), tool
    await tool.connection.aclose()


def fd_kinds() -> collections.Counter[str]:
    """This process's open file descriptors by kind (socket, pipe, file...), for a report."""
    kinds: collections.Counter[str] = collections.Counter()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            kinds[os.readlink(f"/proc/self/fd/{fd}").split(":")[0]] += 1
    return kinds


async def outcome(call: Awaitable[Any]) -> tuple[str, float]:
    """The status code a call ended with, and how long it took."""
    started = time.monotonic()
    try:
        await call
    except CallError as exc:
        return exc.code.name, time.monotonic() - started
    return "OK", time.monotonic() - started


async def calls(make: Callable[[int], Awaitable[Any]], count: int) -> list[tuple[str, float]]:
    """``count`` calls, ``PARALLEL`` at a time."""
    gate = asyncio.Semaphore(PARALLEL)

    async def one(n: int) -> tuple[str, float]:
        async with gate:
            return await outcome(make(n))

    return list(await asyncio.gather(*(one(n) for n in range(count))))


async def test_network_faults_end_calls_with_the_right_code_and_leak_nothing(
        served: Served, proxies: list[ProxyThread]) -> None:
    async with RuntimeClient(served.address) as client:
        paths: dict[str, Callable[[int], Awaitable[Any]]] = {
            "remote-step": lambda n: client.invoke("remote-step", {"n": n},
                                                   timeout=CLIENT_TIMEOUT),
            "remote-tool": lambda n: client.invoke("remote-tool", {"message": str(n)},
                                                   timeout=CLIENT_TIMEOUT),
        }

        async def healthy() -> bool:
            results = [await outcome(make(0)) for make in paths.values()]
            return all(code == "OK" for code, _ in results)

        async def all_heal() -> None:
            await eventually(healthy, timeout=RECOVERY_SECONDS, what="every path healthy")
            await eventually(lambda: load.total_acked() > acked_before + 4,
                             timeout=RECOVERY_SECONDS, what="the actor acknowledging again")

        seen: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        # Warm up every path (connections, pools, caches), then count what the runtime holds.
        load = LedgerLoad("ledger", ["warm-up"], timeout=CLIENT_TIMEOUT, note=False)
        sending = asyncio.create_task(load.run(lambda: client))
        acked_before = 0
        await all_heal()
        await calls(lambda n: asyncio.gather(*(make(n) for make in paths.values())), PARALLEL)
        load.stopping.set()
        await sending
        await close_mcp_session(served)
        before = held(proxies)
        fds_before = fd_kinds()
        # The actor load runs throughout, retrying each message under its id until acked.
        load = LedgerLoad("ledger", ["a", "b"], timeout=CLIENT_TIMEOUT, note=False)
        sending = asyncio.create_task(load.run(lambda: client))
        for fault in FAULTS:
            for proxy in proxies:
                proxy.set_fault(fault)
            codes_before = collections.Counter(load.codes)
            results = await asyncio.gather(*(calls(make, CALLS_PER_FAULT)
                                             for make in paths.values()))
            for name, found in zip(paths, results, strict=True):
                seen[f"{name} {fault.kind}"].update(code for code, _ in found)
                # The runtime answered by its own deadline: never the caller's.
                assert all(took < CLIENT_TIMEOUT / 2 for _, took in found), (name, fault)
            seen[f"ledger {fault.kind}"].update(load.codes - codes_before)
            for proxy in proxies:
                proxy.set_fault(None)
            acked_before = load.total_acked()
            await all_heal()
        load.stopping.set()
        await sending
        for key, codes in seen.items():
            assert set(codes) <= NETWORK_CODES, (key, codes)  # never INTERNAL or UNKNOWN
            if key.endswith("latency"):
                assert set(codes) <= {"OK"}, (key, codes)
            elif key.endswith(("stall", "half_open", "reset")) and not key.startswith("ledger"):
                assert "OK" not in codes, (key, codes)  # the fault did bite
        assert all(took < CLIENT_TIMEOUT / 2 for _, _, took in load.failures), [
            f for f in load.failures if f[2] >= CLIENT_TIMEOUT / 2]
        assert await load.lost_and_twice(client) == (0, 0)
        faulted = sum(sum(c.values()) for c in seen.values())
        assert faulted >= len(FAULTS) * CALLS_PER_FAULT * len(paths)
        # What the faulted calls left behind is gone once they have ended (connections the
        # faults broke are closed; background work finishes).
        await close_mcp_session(served)
        try:
            await eventually(lambda: all(now <= then + slack for now, then, slack in zip(
                held(proxies), before, SLACK, strict=True)), timeout=RECOVERY_SECONDS,
                what="no leak")
        except AssertionError:
            raise AssertionError(f"(tasks, fds, threads) {before} before, {held(proxies)} "
                                 f"after: {fds_before} {fd_kinds()} {dict(seen)}") from None
