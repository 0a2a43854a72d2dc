"""The MCP server in-process: the official SDK client against ``McpService`` (no transport)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from mcp.client import Client
from mcp.shared.exceptions import MCPError

from packetflow.contracts import contract_schema
from packetflow.engine import Engine
from packetflow.manifests import load_text
from packetflow.mcp.server import ERROR_META_KEY, RESOURCE_NOT_FOUND, McpService
from packetflow.mcp.tools import (
    CapabilitySource,
    NamedTool,
    actor_tool_schema,
    sanitize_tool_name,
    unique_names,
)
from packetflow.spec import FieldSchema
from tests.conftest import eventually
from tests.support import handlers
from tests.support.manifests import TEST_MANIFESTS, sample_capabilities

# Both protocol eras the SDK speaks: the 2025-11-25 handshake and the 2026 per-request one.
MODES = ["legacy", "auto"]

EXPOSURE_MANIFESTS = """
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: hidden}
spec:
  intent: Not a tool
  implementation: {builtin: {name: echo}}
  mcp: {expose: false}
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: renamed}
spec:
  intent: Has a chosen tool name
  requires: {message: {type: string}}
  implementation: {builtin: {name: echo}}
  mcp: {name: say.it}
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: say-it}
spec:
  intent: Would like the name too, but derives it
  implementation: {builtin: {name: echo}}
  mcp: {name: echo}
"""


@pytest.fixture
def engine() -> Engine:
    """The sample capabilities plus ones that hide or rename their tools."""
    loaded = load_text(TEST_MANIFESTS + "---" + EXPOSURE_MANIFESTS)
    assert not loaded.errors
    return Engine(loaded.capabilities)


@pytest.fixture(params=MODES)
def mcp(request: pytest.FixtureRequest, engine: Engine) -> Client:
    """An in-process SDK client of the engine's MCP server, to enter in the test's own task
    (anyio task groups cannot span a fixture's setup and teardown tasks)."""
    return Client(McpService.for_engine(engine).server, mode=request.param)


def test_tool_names_are_sanitized_and_unique() -> None:
    def tool(name: str, explicit: bool = False) -> NamedTool:
        return NamedTool(name, explicit, lambda n: None)  # type: ignore[arg-type,return-value]

    assert sanitize_tool_name("a b/c") == "a_b_c"
    assert len(sanitize_tool_name("x" * 300)) == 128
    names = unique_names([tool("echo"), tool("echo", explicit=True), tool("echo")])
    # The explicitly named one keeps the name; derived ones step aside.
    assert list(names) == ["echo", "echo-2", "echo-3"]
    assert names["echo"].explicit


def test_actor_tool_schema_adds_actor_id() -> None:
    schema = actor_tool_schema({"text": FieldSchema(type="string")})
    assert schema["required"] == ["actor_id", "text"]
    assert schema["properties"]["actor_id"]["type"] == "string"
    assert schema["additionalProperties"] is False


async def test_tools_list_schemas_equal_contracts(mcp: Client, engine: Engine) -> None:
    async with mcp as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert "hidden" not in tools
        assert tools["say.it"].description == "Has a chosen tool name"
        # say-it asked for "echo", which capability echo derives too: explicit names win.
        assert tools["echo"].description == "Would like the name too, but derives it"
        assert tools["echo-2"].description == "Echo"
        for capability in sample_capabilities():
            name = {"echo": "echo-2"}.get(capability.name, capability.name)
            assert tools[name].description == capability.spec.intent
            assert tools[name].input_schema == contract_schema(capability.spec.requires)
            assert tools[name].output_schema == contract_schema(capability.spec.provides)
        assert tools["add"].input_schema["required"] == ["a"]
        assert tools["add"].input_schema["additionalProperties"] is False


async def test_call_with_good_arguments(mcp: Client) -> None:
    async with mcp as client:
        result = await client.call_tool("add", {"a": 2, "b": 3})
        assert not result.is_error
        assert result.structured_content == {"sum": 5}
        assert orjson.loads(result.content[0].text) == {"sum": 5}  # type: ignore[union-attr]
        assert (await client.call_tool("price", {"item": "tea", "quantity": 2})
                ).structured_content == {"total": 6, "item": "tea"}


async def test_bad_arguments_are_a_tool_error_naming_the_field(mcp: Client) -> None:
    async with mcp as client:
        result = await client.call_tool("add", {"a": "two", "c": 1})
        assert result.is_error
        text = result.content[0].text  # type: ignore[union-attr]
        assert "input.a" in text and "input.c" in text and "INVALID_ARGUMENT" in text
        assert result.meta is not None
        error = result.meta[ERROR_META_KEY]
        assert error["code"] == "INVALID_ARGUMENT"
        assert {v["field"] for v in error["violations"]} == {"input.a", "input.c"}


async def test_handler_failures_are_tool_errors_without_secrets(mcp: Client) -> None:
    async with mcp as client:
        raised = await client.call_tool("raises", {})
        assert raised.is_error and "INTERNAL" in raised.content[0].text  # type: ignore[union-attr]
        assert "hunter2" not in raised.model_dump_json()
        broken = await client.call_tool("broken", {})
        assert broken.is_error
        assert broken.meta is not None and broken.meta[ERROR_META_KEY]["violations"]
        container = await client.call_tool("container", {})
        assert container.meta is not None
        assert container.meta[ERROR_META_KEY]["code"] == "FAILED_PRECONDITION"


async def test_unknown_tool_is_a_protocol_error(mcp: Client) -> None:
    async with mcp as client:
        with pytest.raises(MCPError) as caught:
            await client.call_tool("no-such-tool", {})
        # -32602 (invalid params), as the README promises: not any protocol error.
        assert caught.value.code == -32602 and "no-such-tool" in caught.value.message
        with pytest.raises(MCPError) as hidden:
            await client.call_tool("hidden", {})  # not exposed: not callable either
        assert hidden.value.code == -32602 and "hidden" in hidden.value.message


async def test_calls_go_through_the_engine_metrics(mcp: Client, engine: Engine) -> None:
    async with mcp as client:
        await client.call_tool("add", {"a": 1})
        await client.call_tool("add", {"a": "x"})
        registry = engine.metrics.registry
        assert registry.get_sample_value("packetflow_capability_calls_total",
                                         {"capability": "add", "code": "OK"}) == 1
        assert registry.get_sample_value("packetflow_capability_calls_total",
                                         {"capability": "add", "code": "INVALID_ARGUMENT"}) == 1


async def test_caller_identity_reaches_the_handler(mcp: Client) -> None:
    async with mcp as client:
        result = await client.call_tool("whoami", {})
        assert result.structured_content is not None
        assert result.structured_content["caller"].startswith("mcp")
        assert result.structured_content["has_deadline"] is True
        assert result.structured_content["effects"] == ["network"]


async def test_every_resource_reads(mcp: Client) -> None:
    async with mcp as client:
        await client.call_tool("add", {"a": 1})
        listed = (await client.list_resources()).resources
        uris = {str(r.uri) for r in listed}
        assert "capability://registry" in uris and "capability://add" in uris
        templates = (await client.list_resource_templates()).resource_templates
        assert [t.uri_template for t in templates] == ["capability://{name}"]
        for uri in sorted(uris):
            contents = (await client.read_resource(uri)).contents
            assert orjson.loads(contents[0].text)  # type: ignore[union-attr]
        registry = orjson.loads((await client.read_resource("capability://registry")
                                 ).contents[0].text)  # type: ignore[union-attr]
        by_name = {c["name"]: c for c in registry["capabilities"]}
        assert by_name["renamed"]["tool"] == "say.it"
        assert by_name["hidden"]["tool"] is None
        add = orjson.loads((await client.read_resource("capability://add")
                            ).contents[0].text)  # type: ignore[union-attr]
        assert add["intent"] == "Add two integers"
        assert add["requires"] == contract_schema(sample_capabilities()[0].spec.requires)
        assert add["stats"]["calls"] == {"OK": 1}
        assert add["stats"]["in_flight"] == 0
        with pytest.raises(MCPError) as caught:
            await client.read_resource("capability://nope")
        assert caught.value.code == RESOURCE_NOT_FOUND


async def test_capability_resource_shows_live_stats(mcp: Client) -> None:
    async def stats(name: str) -> dict[str, Any]:
        read = await client.read_resource(f"capability://{name}")
        return dict(orjson.loads(read.contents[0].text)["stats"])  # type: ignore[union-attr]

    gate = "stats-gate"
    handlers.GATES[gate] = asyncio.Event()
    async with mcp as client:
        await client.call_tool("add", {"a": 1})
        await client.call_tool("add", {"a": 2})
        await client.call_tool("add", {"a": "x"})
        await client.call_tool("broken", {})
        held = asyncio.create_task(client.call_tool("hold", {"gate": gate}))
        await eventually(lambda: _in_flight(stats("hold"), 1), what="the held call")
        add = await stats("add")
        assert add["calls"] == {"INVALID_ARGUMENT": 1, "OK": 2}
        assert (add["calls_total"], add["errors_total"], add["in_flight"]) == (3, 1, 0)
        assert add["mean_seconds"] is not None and add["mean_seconds"] > 0
        assert add["contract_violations"] == 0
        broken = await stats("broken")
        assert broken["calls"] == {"INTERNAL": 1} and broken["contract_violations"] == 1
        assert (await stats("echo"))["mean_seconds"] is None  # never called
        handlers.GATES[gate].set()
        await held
        assert await _in_flight(stats("hold"), 0)


async def _in_flight(stats: Any, count: int) -> bool:
    return bool((await stats)["in_flight"] == count)


async def test_progress_notifications(mcp: Client) -> None:
    async with mcp as client:
        events: list[tuple[float, float | None, str | None]] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            events.append((progress, total, message))

        result = await client.call_tool("progress", {"steps": 3}, progress_callback=on_progress)
        assert result.structured_content == {"steps": 3}
        assert [e[2] for e in events] == ["step 1 of 3", "step 2 of 3", "step 3 of 3"]
        assert events[-1][:2] == (1.0, 1.0)


async def test_client_cancellation_cancels_the_call(mcp: Client, engine: Engine) -> None:
    async with mcp as client:
        handlers.GATES["mcp-cancel"] = asyncio.Event()
        started = len(handlers.STARTED)
        cancelled = len(handlers.CANCELLED)
        call = asyncio.create_task(client.call_tool("hold", {"gate": "mcp-cancel"}))
        await eventually(lambda: len(handlers.STARTED) > started, what="the call to start")
        call.cancel()
        await eventually(lambda: len(handlers.CANCELLED) > cancelled, what="the handler cancelled")
        await eventually(lambda: engine.get("hold").in_flight == 0, what="the slot freed")
        with pytest.raises(asyncio.CancelledError):
            await call


async def test_concurrency_limit_applies(mcp: Client, engine: Engine) -> None:
    async with mcp as client:
        handlers.GATES["mcp-limit"] = asyncio.Event()
        calls = [asyncio.create_task(client.call_tool("hold", {"gate": "mcp-limit"}))
                 for _ in range(2)]
        await eventually(lambda: engine.get("hold").in_flight == 2, what="two calls in flight")
        third = await client.call_tool("hold", {"gate": "mcp-limit"})
        assert third.is_error and third.meta is not None
        assert third.meta[ERROR_META_KEY]["code"] == "RESOURCE_EXHAUSTED"
        handlers.GATES["mcp-limit"].set()
        results: list[Any] = await asyncio.gather(*calls)
        assert all(r.structured_content == {"gate": "mcp-limit"} for r in results)


async def test_reload_changes_the_tool_list(engine: Engine) -> None:
    service = McpService([CapabilitySource(engine)])
    async with Client(service.server, mode="legacy") as client:
        before = {t.name for t in (await client.list_tools()).tools}
        engine.replace([e.capability for e in engine.served.values() if e.name != "add"])
        after = {t.name for t in (await client.list_tools(cache_mode="bypass")).tools}
        assert before - after == {"add"}
        with pytest.raises(MCPError) as caught:
            await client.call_tool("add", {"a": 1})
        assert caught.value.code == -32602
