"""Generated bad input (hypothesis): manifests, composition expressions, call payloads, actor
messages and malformed HTTP/JSON-RPC at the MCP endpoint. Nothing crashes: every manifest
error names its file and where in it; bad calls and messages get a client error, never
INTERNAL or UNKNOWN; the MCP endpoint answers with a JSON-RPC error or a 4xx and keeps
serving. Example counts come from the profile in conftest.py (``ci``: seconds per test).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from packetflow.actors import ActorSystem
from packetflow.client import CallError, RuntimeClient
from packetflow.engine import Engine
from packetflow.manifests import load_paths, load_text
from packetflow.mcp.http import McpHttpServer
from packetflow.mcp.server import McpService
from packetflow.server import RuntimeServer
from tests.support.manifests import sample_capabilities

SERVER_FAULTS = {"INTERNAL", "UNKNOWN"}  # a bug of ours, never the caller's bad input

LEDGER = """
apiVersion: packetflow.io/v1alpha1
kind: Actor
metadata: {name: ledger}
spec:
  intent: Record numbers
  requires: {n: {type: integer}}
  implementation: {python: {module: tests.support.actor_handlers, class: Ledger}}
"""

MANIFEST: dict[str, Any] = {
    "apiVersion": "packetflow.io/v1alpha1", "kind": "Capability",
    "metadata": {"name": "pipeline"},
    "spec": {
        "intent": "Add, then echo",
        "requires": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "provides": {"sum": {"type": "integer"}},
        "timeoutSeconds": 5, "concurrency": 4,
        "implementation": {"composition": {"steps": [
            {"call": {"capability": "add", "input": {"a": "input.a", "b": "input.b"}}},
            {"call": {"capability": "echo"}}]}},
    },
}

scalars = (st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1)
           | st.floats(allow_nan=False) | st.text(max_size=20))
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=12)


def paths_of(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside ``value`` (dict keys, list indices)."""
    found = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            found += paths_of(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += paths_of(child, (*prefix, index))
    return found


def replaced(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    """``value`` with the thing at ``path`` replaced by ``new`` (a copy)."""
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = replaced(value[path[0]], path[1:], new)
    return copy


@st.composite
def broken_manifests(draw: st.DrawFn) -> str:
    """The valid manifest with one value replaced by a generated one, or generated text."""
    if draw(st.booleans()):
        path = draw(st.sampled_from(paths_of(MANIFEST)))
        return yaml.safe_dump(replaced(MANIFEST, path, draw(json_values)))
    return draw(st.text(alphabet=st.sampled_from(list("abc: -[]{}\n\t'\"#&*!|>%@`,?1")),
                        max_size=80))


_files = itertools.count()


@given(text=broken_manifests())
def test_manifest_errors_name_file_and_path(tmp_path: Path, text: str) -> None:
    manifest = tmp_path / f"m{next(_files)}.yaml"
    manifest.write_text(text)
    result = load_paths([manifest])  # what `packetflow validate` runs: it must not raise
    for error in result.errors:
        assert str(error).startswith(str(manifest)), error
        assert error.path or error.line is not None, error  # where in the file


expressions = st.text(alphabet=st.sampled_from(list("inputab.[]{}()|&!=<>@*'`,:0123 $?")),
                      min_size=1, max_size=30)


@given(expression=expressions)
async def test_composition_expressions_are_checked_not_crashed_on(expression: str) -> None:
    step = {"call": {"capability": "add", "input": {"a": expression, "b": "`1`"}}}
    manifest = replaced(MANIFEST, ("spec", "implementation", "composition", "steps"), [step])
    loaded = load_text(yaml.safe_dump(manifest), "pipeline.yaml")
    for error in loaded.errors:
        assert error.source == "pipeline.yaml" and "steps" in error.path, error
    if loaded.errors:
        return
    engine = Engine([*sample_capabilities(), *loaded.capabilities])
    server = await RuntimeServer.start(engine, "127.0.0.1:0")
    try:
        async with RuntimeClient(f"127.0.0.1:{server.port}") as client:
            try:
                await client.invoke("pipeline", {"a": 1, "b": 2}, timeout=10)
            except CallError as exc:
                assert exc.code.name not in SERVER_FAULTS, (expression, exc)
    finally:
        await server.stop(grace=0)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[RuntimeClient]:
    """Sample capabilities, the pipeline composition and the ledger actor, over gRPC."""
    engine = Engine([*sample_capabilities(), *load_text(yaml.safe_dump(MANIFEST)).capabilities])
    system = ActorSystem(engine, state_dir=tmp_path)
    assert not await system.replace(load_text(LEDGER).actors)
    server = await RuntimeServer.start(engine, "127.0.0.1:0", system)
    try:
        async with RuntimeClient(f"127.0.0.1:{server.port}") as client:
            yield client
    finally:
        await server.stop(grace=0)
        await system.aclose()


payloads = st.binary(max_size=64) | json_values.map(orjson.dumps)


@given(capability=st.sampled_from(["add", "echo", "pipeline"]), payload=payloads)
async def test_bad_payloads_get_a_client_error(served: RuntimeClient, capability: str,
                                               payload: bytes) -> None:
    try:
        await served.invoke_raw(capability, payload, timeout=10)
    except CallError as exc:
        assert exc.code.name not in SERVER_FAULTS, (capability, payload, exc)


@given(message=json_values, actor_id=st.text(max_size=12))
async def test_bad_actor_messages_get_a_client_error(served: RuntimeClient, message: Any,
                                                     actor_id: str) -> None:
    try:
        await served.send("ledger", actor_id, message, timeout=10)
    except CallError as exc:
        assert exc.code.name not in SERVER_FAULTS, (actor_id, message, exc)


@pytest.fixture
async def mcp_url() -> AsyncIterator[str]:
    """The MCP streamable HTTP endpoint over the sample capabilities."""
    server = await McpHttpServer.start(McpService.for_engine(Engine(sample_capabilities())),
                                       "127.0.0.1:0")
    try:
        yield server.url
    finally:
        await server.stop()


rpc_like = st.fixed_dictionaries({}, optional={
    "jsonrpc": st.sampled_from(["2.0", "1.0"]) | json_values,
    "id": st.integers(-2**63, 2**63 - 1) | st.text(max_size=5) | json_values,
    "method": st.sampled_from(["initialize", "tools/list", "tools/call", "ping"]) | st.text(
        max_size=10),
    "params": json_values,
})
bodies = st.binary(max_size=64) | rpc_like.map(orjson.dumps) | json_values.map(orjson.dumps)
HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


@given(body=bodies)
async def test_malformed_json_rpc_gets_an_error_not_a_crash(mcp_url: str, body: bytes) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.post(mcp_url, content=body, headers=HEADERS)
        assert response.status_code < 500, (body, response.status_code, response.text)
        if response.status_code >= 400 and response.content:
            # A JSON-RPC error object, not a traceback or an HTML page.
            assert "error" in orjson.loads(response.content), response.text
        # Still serving: a well-formed request is answered.
        ping = await http.post(mcp_url, headers=HEADERS, content=orjson.dumps({
            "jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                "protocolVersion": "2025-06-18", "capabilities": {},
                "clientInfo": {"name": "fuzz", "version": "0"}}}))
        assert ping.status_code == 200, ping.text
