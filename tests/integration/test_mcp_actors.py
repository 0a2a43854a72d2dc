"""Actors over MCP: actor types as tools, actors as ``actor://`` resources, ``ctx.tools``.

The official SDK client in-process, over streamable HTTP (a ``packetflow dev`` process) and
over stdio (``packetflow mcp --stdio``); remote tools against a real SDK server subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import orjson
import pytest
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from packetflow.actors import ActorSystem
from packetflow.contracts import contract_schema
from packetflow.engine import Engine
from packetflow.errors import PacketFlowError, code_of
from packetflow.manifests import load_text
from packetflow.mcp.actors import actor_uri
from packetflow.mcp.server import ERROR_META_KEY, RESOURCE_NOT_FOUND, McpService
from packetflow.mcp.tools import MESSAGE_ID_META, actor_tool_schema
from tests.conftest import eventually
from tests.integration.test_mcp_remote import remote_server
from tests.support import actor_handlers
from tests.support.manifests import sample_capabilities
from tests.support.processes import START_TIMEOUT

ROOT = Path(__file__).resolve().parents[2]
MODES = ["legacy", "auto"]

ACTORS = """
apiVersion: packetflow.io/v1alpha1
kind: Actor
metadata: {name: ledger}
spec:
  intent: Record numbers
  requires: {n: {type: integer}, gate: {type: string, optional: true}}
  provides: {n: {type: integer}, count: {type: integer}}
  implementation: {python: {module: tests.support.actor_handlers, class: Ledger}}
---
apiVersion: packetflow.io/v1alpha1
kind: Actor
metadata: {name: hidden}
spec:
  intent: Not a tool
  implementation: {python: {module: tests.support.actor_handlers}}
  mcp: {expose: false}
---
apiVersion: packetflow.io/v1alpha1
kind: Actor
metadata: {name: echo}
spec:
  intent: An actor whose name a capability has too
  implementation: {python: {module: tests.support.actor_handlers}}
---
apiVersion: packetflow.io/v1alpha1
kind: Actor
metadata: {name: tally}
spec:
  intent: Count messages, under a chosen tool name
  implementation: {python: {module: tests.support.actor_handlers}}
  mcp: {name: counter}
"""


@pytest.fixture
async def system(tmp_path: Path) -> AsyncIterator[ActorSystem]:
    """The sample capabilities and the actor types above, state under ``tmp_path``."""
    engine = Engine(sample_capabilities())
    actors = ActorSystem(engine, state_dir=tmp_path)
    assert not await actors.replace(load_text(ACTORS).actors)
    try:
        yield actors
    finally:
        await actors.aclose()
        await engine.aclose()


@pytest.fixture(params=MODES)
def mcp(request: pytest.FixtureRequest, system: ActorSystem) -> Client:
    """An in-process SDK client of the runtime's MCP server (entered in the test's task)."""
    assert system.engine is not None
    return Client(McpService.for_runtime(system.engine, system).server, mode=request.param)


def turns(system: ActorSystem, actor_type: str, code: str) -> float:
    """Turns of ``actor_type`` that ended with ``code`` (the actor runtime's metric)."""
    assert system.engine is not None
    sample = system.engine.metrics.registry.get_sample_value(
        "packetflow_actor_turn_duration_seconds_count", {"actor_type": actor_type, "code": code})
    return sample or 0.0


def text_of(result: Any) -> str:
    """The text of a tool result or resource (the first content block)."""
    first = (result.content if hasattr(result, "content") else result.contents)[0]
    return str(first.text)


# ------------------------------------------------------------------------------ in-process


async def test_actor_types_are_tools_with_actor_id_and_contract(mcp: Client,
                                                                system: ActorSystem) -> None:
    async with mcp as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    ledger = system.get("ledger").spec
    assert tools["ledger"].input_schema == actor_tool_schema(ledger.requires)
    assert tools["ledger"].input_schema["required"] == ["actor_id", "n"]
    assert tools["ledger"].output_schema == contract_schema(ledger.provides)
    assert tools["ledger"].description == "Record numbers"
    assert "hidden" not in tools
    assert tools["counter"].description == "Count messages, under a chosen tool name"
    # Names are unique across capabilities and actors: the capability came first.
    assert tools["echo"].input_schema == contract_schema(
        system.engine.get("echo").capability.spec.requires)  # type: ignore[union-attr]
    assert tools["echo-2"].description == "An actor whose name a capability has too"


async def test_calls_reach_the_same_actor_and_state_persists(mcp: Client,
                                                             system: ActorSystem) -> None:
    async with mcp as client:
        first = await client.call_tool("ledger", {"actor_id": "a", "n": 1})
        second = await client.call_tool("ledger", {"actor_id": "a", "n": 2})
        other = await client.call_tool("counter", {"actor_id": "a"})
    assert first.structured_content == {"n": 1, "count": 1}
    assert second.structured_content == {"n": 2, "count": 2}
    assert orjson.loads(text_of(second)) == {"n": 2, "count": 2}
    assert other.structured_content == {"count": 1}
    described = await system.get("ledger").describe("a")
    assert described["state"] == {"applied": [1, 2]} and described["version"] == 2
    assert turns(system, "ledger", "OK") == 2  # the turn metrics of gRPC Send


async def test_a_retried_call_with_a_message_id_applies_once(mcp: Client,
                                                              system: ActorSystem) -> None:
    retry = {MESSAGE_ID_META: "order-7"}
    async with mcp as client:
        first = await client.call_tool("ledger", {"actor_id": "m", "n": 7}, meta=retry)
        again = await client.call_tool("ledger", {"actor_id": "m", "n": 7}, meta=retry)
        fresh = await client.call_tool("ledger", {"actor_id": "m", "n": 8})
    assert first.structured_content == again.structured_content == {"n": 7, "count": 1}
    assert fresh.structured_content == {"n": 8, "count": 2}
    assert (await system.get("ledger").describe("m"))["state"] == {"applied": [7, 8]}


async def test_bad_arguments_are_tool_errors_naming_the_field(mcp: Client,
                                                              system: ActorSystem) -> None:
    async with mcp as client:
        no_id = await client.call_tool("ledger", {"n": 1})
        wrong = await client.call_tool("ledger", {"actor_id": "a", "n": "one"})
        extra = await client.call_tool("ledger", {"actor_id": "a", "n": 1, "x": 2})
        with pytest.raises(MCPError) as unknown:
            await client.call_tool("no-such-tool", {"actor_id": "a"})
    assert unknown.value.code == -32602 and "no-such-tool" in unknown.value.message
    assert no_id.is_error and text_of(no_id) == "INVALID_ARGUMENT: actor_id: is required"
    assert wrong.is_error and "message.n" in text_of(wrong)
    assert wrong.meta is not None
    assert wrong.meta[ERROR_META_KEY]["violations"][0]["field"] == "message.n"
    assert extra.is_error and "x" in text_of(extra)
    assert await system.get("ledger").list_actors() == []  # nothing ran


async def test_actor_resources_read_like_get_actor(mcp: Client, system: ActorSystem) -> None:
    odd_id = "team/a b"
    async with mcp as client:
        await client.call_tool("ledger", {"actor_id": odd_id, "n": 5})
        templates = [t.uri_template for t in
                     (await client.list_resource_templates()).resource_templates]
        listed = [r.uri for r in (await client.list_resources()).resources]
        read = orjson.loads(text_of(await client.read_resource(actor_uri("ledger", odd_id))))
        for missing in (actor_uri("ledger", "never"), actor_uri("nope", "a"), "actor://ledger"):
            with pytest.raises(MCPError) as caught:
                await client.read_resource(missing)
            assert caught.value.code == RESOURCE_NOT_FOUND
    assert "actor://{type}/{id}" in templates
    assert actor_uri("ledger", odd_id) in listed
    expected = await system.get("ledger").describe(odd_id)
    assert read == {"type": "ledger", "id": odd_id, **expected}
    assert read["state"] == {"applied": [5]}


async def test_client_cancellation_cancels_the_turn(mcp: Client, system: ActorSystem) -> None:
    actor_handlers.GATES["mcp-actor"] = asyncio.Event()
    kind = system.get("ledger")
    async with mcp as client:
        call = asyncio.create_task(client.call_tool(
            "ledger", {"actor_id": "c", "n": 1, "gate": "mcp-actor"}))
        await eventually(lambda: "c" in kind.active and kind.active["c"].lock.locked(),
                         what="the turn to start")
        call.cancel()
        await eventually(lambda: turns(system, "ledger", "CANCELLED") == 1,
                         what="the turn cancelled")
        with pytest.raises(asyncio.CancelledError):
            await call
        # Nothing of the cancelled turn was committed, and the actor takes the next message.
        after = await client.call_tool("ledger", {"actor_id": "c", "n": 2})
    assert after.structured_content == {"n": 2, "count": 1}


# ----------------------------------------------------------------------- real transports


def copy_examples(tmp_path: Path) -> Path:
    """examples/ (capabilities and actors) in a fresh directory, without any state."""
    target = tmp_path / "examples"
    shutil.copytree(ROOT / "examples", target,
                    ignore=shutil.ignore_patterns(".packetflow", "__pycache__"))
    return target


def subprocess_env() -> dict[str, str]:
    """A ``packetflow`` subprocess's environment: the installed package, not the checkout's
    build metadata (see test_mcp_http)."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


@contextlib.asynccontextmanager
async def dev_with_mcp(manifests: Path, state: Path) -> AsyncIterator[str]:
    """``packetflow dev --mcp-address``; yields its MCP URL. Its log goes to a file (a pipe
    nobody reads could fill and stall it) and the deadlines are a loaded machine's."""
    log = state.parent / "dev.log"
    with log.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "packetflow.cli", "dev", str(manifests), "--no-reload",
            "--address", "127.0.0.1:0", "--metrics-address", "", "--mcp-address",
            "127.0.0.1:0", "--state-dir", str(state), stderr=sink, cwd=manifests,
            env=subprocess_env())
    try:
        found = None
        async with asyncio.timeout(START_TIMEOUT):
            while found is None:
                assert proc.returncode is None, log.read_text()
                found = re.search(r"MCP on (http://\S+/mcp)", log.read_text())
                await asyncio.sleep(0.05)  # polling another process's log, with a deadline
        yield found.group(1)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(START_TIMEOUT):
                await proc.wait()
        except TimeoutError:
            proc.kill()  # never left running: it would haunt a later test
            await proc.wait()
            raise AssertionError(
                f"packetflow dev did not stop on SIGTERM:\n{log.read_text()}") from None


@pytest.mark.timeout(300)  # starting and stopping the examples on a loaded machine
async def test_dev_serves_actor_tools_over_http(tmp_path: Path) -> None:
    examples = copy_examples(tmp_path)
    # This test is about MCP over HTTP, not embeddings: BM25 memory, so no turn waits for
    # torch to load on a busy machine.
    support = examples / "actors" / "customer-support.yaml"
    support.write_text(support.read_text().replace("semanticSearch: true",
                                                   "semanticSearch: false"))
    async with dev_with_mcp(examples, tmp_path / "state") as url, \
            httpx2.AsyncClient(timeout=120) as http, \
            Client(streamable_http_client(url, http_client=http)) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert tools["customer-support"].input_schema["required"] == [
            "actor_id", "customer_id", "message"]
        message = {"actor_id": "c-42", "customer_id": "c-42"}
        first = await client.call_tool("customer-support",
                                       {**message, "message": "My router is broken"})
        second = await client.call_tool("customer-support",
                                        {**message, "message": "Can you send a new one?"})
        assert not first.is_error and not second.is_error
        assert second.structured_content is not None
        assert second.structured_content["conversation_summary"].startswith("2 messages")
        actor = orjson.loads(text_of(await client.read_resource(
            actor_uri("customer-support", "c-42"))))
        assert actor["state"]["messages"] == 2 and actor["memory"]["count"] == 4


async def research(client: Client, query: str) -> dict[str, Any]:
    """Ask the example research assistant ``ada`` something; its reply."""
    result = await client.call_tool("research-assistant", {"actor_id": "ada", "query": query})
    assert not result.is_error, text_of(result)
    assert isinstance(result.structured_content, dict)
    return result.structured_content


async def test_stdio_serves_actors_with_state_under_the_state_dir(tmp_path: Path) -> None:
    examples = copy_examples(tmp_path)
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "packetflow.cli", "mcp", "--stdio", str(examples),
                                      "--state-dir", str(tmp_path / "state")],
        cwd=str(tmp_path), env=subprocess_env())
    async with Client(params, mode="legacy") as client:
        assert "research-assistant" in {t.name for t in (await client.list_tools()).tools}
        assert (await research(client, "graph databases for fraud detection"))["turns"] == 1
        again = await research(client, "fraud rings in a graph")
        assert again["turns"] == 2 and again["related"]
    # A new server process finds the conversation in the state dir.
    async with Client(params, mode="legacy") as client:
        assert (await research(client, "graph queries"))["turns"] == 3
        actor = orjson.loads(text_of(await client.read_resource(
            "actor://research-assistant/ada")))
        assert len(actor["state"]["research_history"]) == 3
        # The assistant's keywords came from text-stats through ctx.tools (mcpTools).
        stats = orjson.loads(text_of(await client.read_resource("capability://text-stats")))
        assert stats["stats"]["calls"] == {"OK": 1}


# --------------------------------------------------------------------- ctx.tools, remote

REMOTE_TOOLS = """
apiVersion: packetflow.io/v1alpha1
kind: Actor
metadata: {{name: tools}}
spec:
  intent: Call remote tools
  implementation: {{python: {{module: tests.support.actor_handlers, class: ToolUser}}}}
  timeoutSeconds: 20
  mcpTools:
    - {{name: echo, url: "{url}"}}
    - {{name: nap, url: "{url}", tool: slow}}
    - {{name: broken, url: "{url}", tool: fails}}
    - {{name: gone, url: "{dead}"}}
"""


def dead_url() -> str:
    """An MCP URL on a loopback port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/mcp"


async def failure(system: ActorSystem, message: dict[str, Any],
                  deadline: float | None = None) -> PacketFlowError:
    """The error a message to the ``tools`` actor fails with."""
    with pytest.raises(PacketFlowError) as caught:
        await system.get("tools").send("r", message, deadline=deadline)
    return caught.value


async def test_ctx_tools_calls_remote_mcp_tools(tmp_path: Path) -> None:
    engine = Engine([])
    system = ActorSystem(engine, state_dir=tmp_path)
    async with remote_server() as (url, _proc):
        manifest = REMOTE_TOOLS.format(url=url, dead=dead_url())
        assert not await system.replace(load_text(manifest).actors)
        try:
            reply = (await system.get("tools").send(
                "r", {"tool": "echo", "args": {"message": "hi"}})).reply
            assert reply["output"] == {"message": "hi"}
            # The remote tool's own contract is checked before calling.
            bad = await failure(system, {"tool": "echo", "args": {"message": 7}})
            assert code_of(bad).value == "INVALID_ARGUMENT" and "input.message" in bad.message
            broken = await failure(system, {"tool": "broken"})
            assert code_of(broken).value == "INTERNAL" and "broke on purpose" in broken.message
            gone = await failure(system, {"tool": "gone", "args": {"message": "x"}})
            assert code_of(gone).value == "UNAVAILABLE"
            # Nothing runs past the turn's deadline: here the caller's, 3 s (timeoutSeconds,
            # 20 s, leaves room for opening sessions on a busy machine). A tool call that did
            # not carry it would run into the bound.
            deadline = asyncio.get_running_loop().time() + 3
            async with asyncio.timeout(15):
                slow = await failure(system, {"tool": "nap", "args": {"seconds": 30}}, deadline)
            assert code_of(slow).value == "DEADLINE_EXCEEDED"
            assert (await system.get("tools").describe("r"))["state"] == {"calls": 1}
        finally:
            await system.aclose()
            await engine.aclose()
