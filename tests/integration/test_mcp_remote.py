"""Consuming MCP: a real SDK ``MCPServer`` in a subprocess, its tools run as capabilities."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from packetflow.context import CallContext
from packetflow.engine import Engine
from packetflow.errors import PacketFlowError, Unavailable, code_of
from packetflow.manifests import load_text
from packetflow.mcp import remote as remote_module
from packetflow.mcp.remote import McpConnection, RemoteMcpTool
from packetflow.mcp.server import McpService
from packetflow.mcp.toolbox import McpToolbox, ToolNotDeclared
from packetflow.spec import McpToolRef, ValueSource
from tests.conftest import eventually
from tests.support.mcp_remote_server import remote_server


def remote_engine(url: str, tools: dict[str, str], extra: str = "") -> Engine:
    """An engine with one capability per remote tool (capability name -> tool)."""
    text = "\n---\n".join(f"""
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {{name: {name}}}
spec:
  intent: The remote {tool} tool
  timeoutSeconds: 3
  implementation: {{mcp: {{url: "{url}", tool: {tool}{extra}}}}}
""" for name, tool in tools.items())
    loaded = load_text(text)
    assert not loaded.errors, loaded.errors
    engine = Engine(loaded.capabilities)
    assert not engine.load_errors, engine.load_errors
    return engine


async def invoke(engine: Engine, name: str, value: dict[str, Any]) -> dict[str, Any]:
    """One call, as gRPC would make it."""
    return await engine.invoke(name, value, CallContext(name, os.urandom(8).hex()))


async def failure(engine: Engine, name: str, value: dict[str, Any]) -> PacketFlowError:
    """The domain error a call ends with."""
    with pytest.raises(PacketFlowError) as caught:
        await invoke(engine, name, value)
    return caught.value


@pytest.fixture
async def remote() -> AsyncIterator[str]:
    """A running remote MCP server's URL."""
    async with remote_server() as (url, _proc):
        yield url


async def test_remote_tool_is_a_capability_with_its_contract(remote: str) -> None:
    engine = remote_engine(remote, {"r-echo": "echo", "r-fails": "fails", "r-nope": "nope"})
    try:
        assert await invoke(engine, "r-echo", {"message": "hi"}) == {"message": "hi"}
        bad = await failure(engine, "r-echo", {"message": 7})
        assert code_of(bad).value == "INVALID_ARGUMENT" and "input.message" in bad.message
        failed = await failure(engine, "r-fails", {})
        assert code_of(failed).value == "INTERNAL" and "broke on purpose" in failed.message
        missing = await failure(engine, "r-nope", {})
        assert code_of(missing).value == "FAILED_PRECONDITION" and "'nope'" in missing.message

        # Served back out over MCP, the proxied tool carries the remote schema once known.
        tools = {t.name: t for t in McpService.for_engine(engine).list_tools()}
        assert tools["r-echo"].input_schema["required"] == ["message"]
        assert tools["r-echo"].output_schema is not None
        assert tools["r-echo"].output_schema["properties"]["message"]["type"] == "string"
    finally:
        await engine.aclose()


async def test_schema_refreshes_when_the_remote_tool_changes(remote: str) -> None:
    engine = remote_engine(remote, {"greet": "greet", "reshape": "reshape"})
    try:
        assert await invoke(engine, "greet", {"name": "ada"}) == {"greeting": "hello ada"}
        await invoke(engine, "reshape", {})
        # The cached schema wants `name`; the server now wants first and last. The mismatch
        # triggers a re-list instead of a wrong refusal.
        assert await invoke(engine, "greet", {"first": "ada", "last": "lovelace"}) == {
            "greeting": "hello ada lovelace"}
        stale = await failure(engine, "greet", {"name": "ada"})
        assert code_of(stale).value == "INVALID_ARGUMENT"
    finally:
        await engine.aclose()


async def test_slow_remote_ends_at_the_deadline(remote: str) -> None:
    engine = remote_engine(remote, {"slow": "slow"})
    try:
        slow = await failure(engine, "slow", {"seconds": 30})
        assert code_of(slow).value == "DEADLINE_EXCEEDED"
        assert await invoke(engine, "slow", {"seconds": 0}) == {"message": "slept 0.0"}
    finally:
        await engine.aclose()


async def test_server_going_away_mid_call_and_down() -> None:
    async with remote_server() as (url, proc):
        engine = remote_engine(url, {"slow": "slow", "echo": "echo"})
        try:
            assert await invoke(engine, "echo", {"message": "up"}) == {"message": "up"}
            call = asyncio.create_task(invoke(engine, "slow", {"seconds": 20}))
            await asyncio.sleep(0)  # let the call go out before the server dies
            await _until_in_flight(engine, "slow")
            proc.kill()
            await proc.wait()
            with pytest.raises(PacketFlowError) as caught:
                await call
            # Lost, not waited out: a call left hanging would end at its deadline instead.
            assert code_of(caught.value).value == "UNAVAILABLE"
            # Down: every later call fails fast and clearly, none hangs.
            for _ in range(2):
                down = await failure(engine, "echo", {"message": "anyone?"})
                assert code_of(down).value == "UNAVAILABLE" and url in down.message
        finally:
            await engine.aclose()


async def _until_in_flight(engine: Engine, name: str) -> None:
    await eventually(lambda: engine.get(name).in_flight == 1, what="the call in flight")


async def test_unreachable_server_at_start() -> None:
    engine = remote_engine("http://127.0.0.1:9/mcp", {"echo": "echo"})
    try:
        # At load a server that is not up yet is no error (it may start after us)...
        assert await engine.verify_remotes(timeout=3) == []
        # ...its calls are UNAVAILABLE until it is.
        down = await failure(engine, "echo", {"message": "x"})
        assert code_of(down).value == "UNAVAILABLE"
    finally:
        await engine.aclose()


async def test_missing_remote_tool_is_a_load_error_naming_the_field(remote: str) -> None:
    engine = remote_engine(remote, {"r-echo": "echo", "r-nope": "nope"})
    try:
        errors = await engine.verify_remotes()
        assert [(e.source, e.path) for e in errors] == [
            ("capability r-nope", "spec.implementation.mcp.tool")]
        assert "has no tool 'nope'" in errors[0].message
        # The tool that exists had its contract fetched at load: it shows before any call.
        tools = {t.name: t for t in McpService.for_engine(engine).list_tools()}
        assert tools["r-echo"].input_schema["required"] == ["message"]
    finally:
        await engine.aclose()


async def test_headers_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    async with remote_server(token="sesame") as (url, _proc):
        monkeypatch.setenv("REMOTE_TOKEN", "Bearer sesame")
        headers = ", headersFrom: {Authorization: {env: REMOTE_TOKEN}}"
        engine = remote_engine(url, {"echo": "echo"}, headers)
        try:
            assert await invoke(engine, "echo", {"message": "ok"}) == {"message": "ok"}
        finally:
            await engine.aclose()
        monkeypatch.setenv("REMOTE_TOKEN", "Bearer wrong")
        refused = remote_engine(url, {"echo": "echo"}, headers)
        try:
            assert code_of(await failure(refused, "echo", {"message": "x"})).value == \
                "UNAVAILABLE"
        finally:
            await refused.aclose()
        monkeypatch.delenv("REMOTE_TOKEN")
        loaded = load_text(f"""
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {{name: echo}}
spec:
  intent: needs a secret
  implementation: {{mcp: {{url: "{url}", tool: echo{headers}}}}}
""")
        errors = Engine(loaded.capabilities).load_errors
        assert [e.path for e in errors] == ["spec.implementation.mcp.headersFrom.Authorization"]


async def test_toolbox_calls_local_and_remote_tools(remote: str) -> None:
    local = load_text("""
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: add}
spec:
  intent: Add
  requires: {a: {type: integer}, b: {type: integer}}
  implementation: {builtin: {name: transform, config: {expression: "{sum: sum([a, b])}"}}}
""")
    engine = Engine(local.capabilities)
    toolbox = McpToolbox([McpToolRef(name="plus", capability="add"),
                          McpToolRef(name="echo", url=remote),
                          McpToolRef(name="shout", url=remote, tool="echo",
                                     headers_from={"X-Unused": ValueSource(env="HOME")})],
                         engine.invoke)
    try:
        assert toolbox.names() == ["echo", "plus", "shout"]
        assert await toolbox.call("plus", {"a": 1, "b": 2}) == {"sum": 3}
        assert await toolbox.call("echo", {"message": "hi"}) == {"message": "hi"}
        assert await toolbox.call("shout", {"message": "HI"}) == {"message": "HI"}
        with pytest.raises(ToolNotDeclared):
            await toolbox.call("rm", {})
    finally:
        await toolbox.aclose()
        await engine.aclose()


def owner_tasks() -> list[asyncio.Task[Any]]:
    """The tasks that own a connection's MCP session (connecting or connected)."""
    return [task for task in asyncio.all_tasks()
            if getattr(task.get_coro(), "cr_code", None) is McpConnection._own.__code__]


@pytest.fixture
def silent() -> Iterator[str]:
    """A URL whose port takes TCP connections (the kernel's backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/mcp"


async def _cancelled_while_connecting(connection: McpConnection) -> None:
    """A caller that gives up after the connect started (a deadline, a cancellation)."""
    caller = asyncio.create_task(connection.client())
    await asyncio.sleep(0)  # one step: the caller starts the connect and waits for it
    assert len(owner_tasks()) == 1
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller


async def test_concurrent_first_calls_share_one_connection(remote: str) -> None:
    connection = McpConnection(remote)
    tools = [RemoteMcpTool(remote, "echo", connection=connection) for _ in range(3)]
    try:
        clients = await asyncio.gather(*(connection.client() for _ in range(5)))
        assert all(client is clients[0] for client in clients)
        results = await asyncio.gather(*(tool.refresh() for tool in tools))
        assert all(r.input_schema["required"] == ["message"] for r in results)
        assert len(owner_tasks()) == 1
    finally:
        await connection.aclose()
    assert owner_tasks() == []


async def test_a_cancelled_caller_does_not_abandon_the_shared_connect(remote: str) -> None:
    connection = McpConnection(remote)
    try:
        await _cancelled_while_connecting(connection)
        # The next caller joins the connect already in flight instead of starting another.
        client = await connection.client()
        assert len(owner_tasks()) == 1
        assert await connection.client() is client
        assert (await client.list_tools()).tools
    finally:
        await connection.aclose()
    assert owner_tasks() == []


async def test_a_stale_reset_does_not_drop_the_newer_session(remote: str) -> None:
    connection = McpConnection(remote)
    try:
        first = await connection.client()
        connection.reset(first)
        second = await connection.client()
        assert second is not first
        connection.reset(first)  # a late report about the old session
        assert await connection.client() is second
        await eventually(lambda: len(owner_tasks()) == 1, what="the old session closed")
    finally:
        await connection.aclose()
    assert owner_tasks() == []


async def test_connect_to_a_silent_server_is_bounded_and_leaves_no_task(
        silent: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote_module, "CONNECT_TIMEOUT", 0.5)
    connection = McpConnection(silent)
    try:
        await _cancelled_while_connecting(connection)
        with pytest.raises(Unavailable, match=r"did not answer within 0\.5s"):
            await connection.client()  # joins the connect in flight: it ends at its timeout
        await eventually(lambda: owner_tasks() == [], what="the abandoned connect ended")
    finally:
        await connection.aclose()
    assert owner_tasks() == []


async def test_aclose_abandons_a_connect_in_flight(silent: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # A connect that would take an hour: waiting it out would hit the bound below.
    monkeypatch.setattr(remote_module, "CONNECT_TIMEOUT", 3600)
    connection = McpConnection(silent)
    waiting = asyncio.create_task(connection.client())
    await asyncio.sleep(0)
    assert len(owner_tasks()) == 1
    await asyncio.wait_for(connection.aclose(), 60)
    assert owner_tasks() == []
    with pytest.raises(Unavailable, match="closed the connection"):
        await waiting


async def test_load_check_shorter_than_the_connect_leaves_no_task(
        silent: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # verify gives up before the connect does (an hour here: waiting it out would hit the
    # bound below).
    monkeypatch.setattr(remote_module, "CONNECT_TIMEOUT", 3600)
    engine = remote_engine(silent, {"echo": "echo", "again": "echo"})
    try:
        assert await engine.verify_remotes(timeout=0.2) == []
        assert len(owner_tasks()) == 2  # still connecting: each capability has its own
    finally:
        await asyncio.wait_for(engine.aclose(), 60)  # abandoned at once, not waited out
    assert owner_tasks() == []
