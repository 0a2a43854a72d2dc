"""MCP over real transports: streamable HTTP (uvicorn on 127.0.0.1), stdio, two replicas."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import httpx2
import orjson
import pytest
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from packetflow.contracts import contract_schema
from packetflow.engine import Engine
from packetflow.mcp.http import McpHttpServer
from packetflow.mcp.server import McpService
from tests.conftest import eventually
from tests.support import handlers
from tests.support.manifests import BUILTIN_MANIFESTS, sample_capabilities

TOKEN = "test-token-123"
ACCEPT = "application/json, text/event-stream"
LIST_TOOLS = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
CALL_HOLD = {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
             "params": {"name": "hold", "arguments": {"gate": "never"}}}

# A runtime serves the planner beside its capabilities (see the Planner section).
PLANNER_TOOLS = ("plan", "plan_and_execute", "feedback")


def subprocess_env() -> dict[str, str]:
    """The environment for a ``packetflow`` subprocess: the installed package, run outside
    the repository root (whose build-artifact metadata may predate newer entry points)."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


@pytest.fixture
def engine() -> Engine:
    """The sample capabilities."""
    return Engine(sample_capabilities())


@pytest.fixture
async def open_server(engine: Engine) -> AsyncIterator[McpHttpServer]:
    """Streamable HTTP without auth on an ephemeral loopback port."""
    server = await McpHttpServer.start(McpService.for_engine(engine), "127.0.0.1:0")
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def secured_server(engine: Engine) -> AsyncIterator[McpHttpServer]:
    """Streamable HTTP that wants a bearer token."""
    server = await McpHttpServer.start(McpService.for_engine(engine), "127.0.0.1:0", TOKEN)
    try:
        yield server
    finally:
        await server.stop()


def http_client(url: str, token: str | None = None, *, fresh_connections: bool = False,
                mode: str = "auto") -> tuple[httpx2.AsyncClient, Client]:
    """An SDK client over streamable HTTP (and its HTTP client, to close after it)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    # Without keep-alive every request opens a connection: a round-robin TCP proxy then
    # alternates requests, not connections.
    limits = httpx2.Limits(max_keepalive_connections=0) if fresh_connections else None
    http = httpx2.AsyncClient(headers=headers, limits=limits) if limits else \
        httpx2.AsyncClient(headers=headers)
    return http, Client(streamable_http_client(url, http_client=http), mode=mode)


def calls(engine: Engine, capability: str) -> float:
    """Calls of ``capability`` the engine counted, any outcome."""
    registry = engine.metrics.registry
    return sum(registry.get_sample_value("packetflow_capability_calls_total",
                                         {"capability": capability, "code": code}) or 0.0
               for code in ("OK", "INVALID_ARGUMENT", "CANCELLED", "INTERNAL"))


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_list_and_call_over_http(open_server: McpHttpServer, mode: str) -> None:
    http, client = http_client(open_server.url, mode=mode)
    async with http, client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        add = sample_capabilities()[0]
        assert tools["add"].input_schema == contract_schema(add.spec.requires)
        assert tools["add"].output_schema == contract_schema(add.spec.provides)
        good = await client.call_tool("add", {"a": 40, "b": 2})
        assert good.structured_content == {"sum": 42}
        bad = await client.call_tool("add", {"a": "forty"})
        assert bad.is_error and "input.a" in bad.content[0].text  # type: ignore[union-attr]
        registry = orjson.loads((await client.read_resource("capability://registry")
                                 ).contents[0].text)  # type: ignore[union-attr]
        assert {c["name"] for c in registry["capabilities"]} >= {"add", "echo"}


async def test_progress_and_cancellation_over_http(open_server: McpHttpServer,
                                                   engine: Engine) -> None:
    http, client = http_client(open_server.url, mode="legacy")
    async with http, client:
        messages: list[str | None] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            messages.append(message)

        done = await client.call_tool("progress", {"steps": 2}, progress_callback=on_progress)
        assert done.structured_content == {"steps": 2}
        assert messages == ["step 1 of 2", "step 2 of 2"]

        handlers.GATES["http-cancel"] = asyncio.Event()
        cancelled = len(handlers.CANCELLED)
        call = asyncio.create_task(client.call_tool("hold", {"gate": "http-cancel"}))
        await eventually(lambda: engine.get("hold").in_flight == 1, what="the call to start")
        call.cancel()
        await eventually(lambda: len(handlers.CANCELLED) > cancelled, what="handler cancelled")
        await eventually(lambda: engine.get("hold").in_flight == 0, what="the slot freed")
        with pytest.raises(asyncio.CancelledError):
            await call


async def test_token_required_and_nothing_runs_without_it(secured_server: McpHttpServer,
                                                          engine: Engine) -> None:
    started = len(handlers.STARTED)
    async with httpx.AsyncClient() as raw:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            response = await raw.post(secured_server.url, json=CALL_HOLD,
                                      headers={"Accept": ACCEPT, **headers})
            assert response.status_code == 401
            assert response.headers["www-authenticate"].startswith("Bearer")
    assert len(handlers.STARTED) == started and calls(engine, "hold") == 0

    http, client = http_client(secured_server.url)  # no token: the SDK client is refused too
    with pytest.raises(Exception, match="error"):
        async with http, client:
            await client.list_tools()

    http, client = http_client(secured_server.url, TOKEN)
    async with http, client:
        assert (await client.call_tool("add", {"a": 1})).structured_content == {"sum": 1}
    assert calls(engine, "add") == 1 and calls(engine, "hold") == 0


async def test_dns_rebinding_protection_on_loopback(open_server: McpHttpServer,
                                                    engine: Engine) -> None:
    async with httpx.AsyncClient() as raw:
        wrong_host = await raw.post(open_server.url, json=CALL_HOLD,
                                    headers={"Accept": ACCEPT, "Host": "evil.example"})
        assert wrong_host.status_code == 421
        wrong_origin = await raw.post(open_server.url, json=CALL_HOLD, headers={
            "Accept": ACCEPT, "Origin": "http://evil.example"})
        assert wrong_origin.status_code == 403
        local = await raw.post(open_server.url, json=LIST_TOOLS, headers={
            "Accept": ACCEPT, "Origin": f"http://localhost:{open_server.port}",
            "MCP-Protocol-Version": "2025-11-25"})
        assert local.status_code == 200
    assert calls(engine, "hold") == 0


async def test_stdio_subprocess(tmp_path: Path) -> None:
    (tmp_path / "caps.yaml").write_text(BUILTIN_MANIFESTS)
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "packetflow.cli", "mcp", "--stdio", str(tmp_path)],
        cwd=str(tmp_path), env=subprocess_env())
    async with Client(params, mode="legacy") as client:
        tools = {t.name for t in (await client.list_tools()).tools}
        assert tools == {"add", "echo", *PLANNER_TOOLS}
        result = await client.call_tool("echo", {"message": "over stdio"})
        assert result.structured_content == {"message": "over stdio"}
        bad = await client.call_tool("echo", {})
        assert bad.is_error and "input.message" in bad.content[0].text  # type: ignore[union-attr]
        echo = orjson.loads((await client.read_resource("capability://echo")
                             ).contents[0].text)  # type: ignore[union-attr]
        assert echo["stats"]["calls"] == {"INVALID_ARGUMENT": 1, "OK": 1}


async def test_stdio_fires_scheduled_compositions(tmp_path: Path) -> None:
    (tmp_path / "tick.yaml").write_text("""
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: note}
spec:
  intent: Accept any event
  implementation: {builtin: {name: echo}}
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: tick}
spec:
  intent: Every second, note the schedule event
  implementation:
    composition:
      steps: [{call: {capability: note}}]
      triggers: [{schedule: "* * * * * *"}]
""")
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "packetflow.cli", "mcp", "--stdio", str(tmp_path)],
        cwd=str(tmp_path), env=subprocess_env())
    async with Client(params, mode="legacy") as client:
        async def noted() -> bool:
            read = await client.read_resource("capability://note")
            stats = orjson.loads(read.contents[0].text)["stats"]  # type: ignore[union-attr]
            return bool(stats["calls"].get("OK", 0) >= 1)

        await eventually(noted, timeout=15, what="the schedule to fire over stdio")
    assert (tmp_path / ".packetflow" / "triggers.db").is_file()  # keys kept durably


# ------------------------------------------------------------------ two replicas, one address


@contextlib.asynccontextmanager
async def replica(manifests: Path) -> AsyncIterator[str]:
    """A ``packetflow dev`` process serving MCP; yields its MCP URL."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "packetflow.cli", "dev", str(manifests), "--no-reload",
        "--address", "127.0.0.1:0", "--metrics-address", "", "--mcp-address", "127.0.0.1:0",
        "--state-dir", str(manifests / ".state"),
        stderr=asyncio.subprocess.PIPE, cwd=manifests, env=subprocess_env())
    assert proc.stderr is not None
    try:
        url = None
        async with asyncio.timeout(30):
            while url is None:
                line = (await proc.stderr.readline()).decode()
                assert line, "the replica exited before serving MCP"
                if found := re.search(r"MCP on (http://\S+/mcp)", line):
                    url = found.group(1)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            await proc.communicate()


@contextlib.asynccontextmanager
async def round_robin_proxy(ports: list[int]) -> AsyncIterator[int]:
    """A TCP proxy on 127.0.0.1 sending each new connection to the next backend in turn."""
    backends = itertools.cycle(ports)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1",
                                                                         next(backends))
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def _calls_seen(url: str) -> int:
    http, client = http_client(url, mode="legacy")
    async with http, client:
        stats = orjson.loads((await client.read_resource("capability://add")
                              ).contents[0].text)["stats"]  # type: ignore[union-attr]
        return int(stats["calls"].get("OK", 0))


async def test_two_replicas_behind_one_address_without_sticky_sessions(tmp_path: Path) -> None:
    (tmp_path / "caps.yaml").write_text(BUILTIN_MANIFESTS)
    async with replica(tmp_path) as first, replica(tmp_path) as second:
        ports = [int(url.rsplit(":", 1)[1].split("/")[0]) for url in (first, second)]
        async with round_robin_proxy(ports) as port:
            # The legacy era has an initialize handshake, so it would break first if a replica
            # needed to have seen the session's earlier requests.
            for mode in ("legacy", "auto"):
                http, client = http_client(f"http://127.0.0.1:{port}/mcp",
                                           fresh_connections=True, mode=mode)
                async with http, client:
                    assert {t.name for t in (await client.list_tools()).tools} == {
                        "add", "echo", *PLANNER_TOOLS}
                    for a in range(6):
                        result = await client.call_tool("add", {"a": a})
                        assert result.structured_content == {"sum": a}
        seen = [await _calls_seen(first), await _calls_seen(second)]
        assert sum(seen) == 12 and all(seen), seen
