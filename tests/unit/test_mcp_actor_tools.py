"""``ctx.tools``: an actor calls the tools its manifest declares in ``mcpTools`` (local side).

Remote tools (a real MCP server in a subprocess) are in tests/integration/test_mcp_actors.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from packetflow.actors import ActorSystem
from packetflow.engine import Engine
from packetflow.errors import CapabilityNotFound, InvalidInput
from packetflow.manifests import load_text
from packetflow.mcp.toolbox import ToolNotDeclared
from tests.support.manifests import sample_capabilities

TOOL_USER = """
apiVersion: packetflow.io/v1alpha1
kind: Actor
metadata: {{name: {name}}}
spec:
  intent: Call declared tools
  implementation: {{python: {{module: tests.support.actor_handlers, class: ToolUser}}}}
  mcpTools: {tools}
"""
LOCAL_TOOLS = "[{name: shout, capability: echo}, {name: who, capability: whoami}, " \
              "{name: ghost, capability: not-served}]"


def tool_user(tools: str, name: str = "tools") -> str:
    """An Actor manifest whose handler is ``ToolUser`` with these ``mcpTools``."""
    return TOOL_USER.format(name=name, tools=tools)


@pytest.fixture
async def system(tmp_path: Path) -> AsyncIterator[ActorSystem]:
    """The sample capabilities and one actor type declaring local tools."""
    engine = Engine(sample_capabilities())
    actors = ActorSystem(engine, state_dir=tmp_path)
    assert not await actors.replace(load_text(tool_user(LOCAL_TOOLS)).actors)
    try:
        yield actors
    finally:
        await actors.aclose()
        await engine.aclose()


def calls(system: ActorSystem, capability: str, code: str = "OK") -> float:
    """How many calls of ``capability`` the engine counted with ``code``."""
    assert system.engine is not None
    value = system.engine.metrics.registry.get_sample_value(
        "packetflow_capability_calls_total", {"capability": capability, "code": code})
    return value or 0.0


async def test_local_capability_runs_through_the_engine(system: ActorSystem) -> None:
    kind = system.get("tools")
    result = await kind.send("a", {"tool": "shout", "args": {"message": "hi"}})
    assert result.reply == {"output": {"message": "hi"}, "tools": ["ghost", "shout", "who"]}
    assert calls(system, "echo") == 1
    # The turn's identity, trace and deadline carry over to the capability.
    who = await kind.send("a", {"tool": "who"}, trace_id="t" * 32)
    assert who.reply["output"]["caller"] == "actor:tools/a"
    assert who.reply["output"]["trace_id"] == "t" * 32
    assert who.reply["output"]["has_deadline"] is True
    assert (await kind.describe("a"))["state"] == {"calls": 2}


async def test_local_capability_contract_applies(system: ActorSystem) -> None:
    with pytest.raises(InvalidInput) as caught:
        await system.get("tools").send("a", {"tool": "shout", "args": {"message": 7}})
    assert [v.field for v in caught.value.violations] == ["input.message"]
    assert calls(system, "echo", "INVALID_ARGUMENT") == 1


async def test_unknown_tool_is_a_clear_error_naming_it(system: ActorSystem) -> None:
    kind = system.get("tools")
    with pytest.raises(ToolNotDeclared) as caught:
        await kind.send("a", {"tool": "rm"})
    assert "'rm' is not declared in mcpTools (declared: ghost, shout, who)" in str(caught.value)
    # A handler may catch it; NOT_FOUND like any missing capability.
    reply = (await kind.send("a", {"tool": "rm", "catch": True})).reply
    assert reply["error"] == "NOT_FOUND" and "'rm'" in reply["message"]
    # A declared tool whose capability is not served here names the capability.
    with pytest.raises(CapabilityNotFound, match="not-served"):
        await kind.send("a", {"tool": "ghost"})


async def test_an_actor_without_mcp_tools_has_none(system: ActorSystem, tmp_path: Path) -> None:
    assert not await system.replace(load_text(tool_user("[]", name="plain")).actors)
    with pytest.raises(ToolNotDeclared, match="declared: none"):
        await system.get("plain").send("a", {"tool": "shout"})


async def test_missing_header_secret_is_a_load_error_naming_the_field(
        system: ActorSystem, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PF_TEST_TOKEN", raising=False)
    remote = ('[{name: search, url: "http://127.0.0.1:9/mcp", '
              'headersFrom: {Authorization: {env: PF_TEST_TOKEN}}}]')
    errors = await system.replace(load_text(tool_user(remote, name="remote")).actors)
    assert [(e.source, e.path) for e in errors] == [
        ("actor remote", "spec.mcpTools[0].headersFrom.Authorization")]
    assert "PF_TEST_TOKEN" in errors[0].message
    assert "remote" not in system.types
