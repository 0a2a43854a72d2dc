"""The planner over real gRPC and MCP: Plan, PlanAndExecute with progress, feedback by trace
id teaching the planner, the planner implementation kind, a shared PostgreSQL store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from mcp.client import Client

from packetflow.client import CallError, ProgressEvent, RuntimeClient
from packetflow.context import CallContext
from packetflow.engine import Engine
from packetflow.feedback import FeedbackService, SqliteFeedbackStore
from packetflow.manifests import load_text
from packetflow.mcp.planner import planner_source
from packetflow.mcp.server import McpService
from packetflow.planner.core import Planner, PlanRequest
from packetflow.planner.handler import open_planning, runtime_planner
from packetflow.planner.learning import Outcome
from packetflow.planner.settings import PlannerSettings
from packetflow.planner.store import postgres_store
from packetflow.server import RuntimeServer
from tests.support.planner import registry

pytest_plugins = ["tests.support.postgres"]

TEXT = "The cat is on the mat. The dog sleeps in the garden."
INTENT = "summarise this text and translate the summary to French"

PLANNER_MANIFEST = """
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: do-it}
spec:
  intent: Execute tasks described in a sentence
  requires:
    intent: {type: string}
    input: {type: object, default: {}}
  provides:
    plan: {type: object}
    results: {type: [object, "null"]}
    traceId: {type: string}
  implementation:
    planner: {capabilities: [summarize-text, translate-text, count-words], maxSteps: 3}
"""


class Served:
    """A runtime serving the registry, with feedback and a planner, as ``serve`` wires it."""

    def __init__(self, engine: Engine, feedback: FeedbackService, planner: Planner,
                 server: RuntimeServer) -> None:
        self.engine, self.feedback, self.planner, self.server = engine, feedback, planner, server
        self.address = f"127.0.0.1:{server.port}"


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    capabilities = [*registry(), *load_text(PLANNER_MANIFEST).capabilities]
    engine = Engine(capabilities)
    assert not engine.load_errors, engine.load_errors
    feedback = FeedbackService(SqliteFeedbackStore(tmp_path / "feedback.db"),
                               engine.metrics.registry, engine.traces)
    planning = await open_planning(tmp_path, feedback.store, engine.metrics.registry,
                                   PlannerSettings(embeddings=False))
    engine.planning = planning
    planner = runtime_planner(planning, engine.capabilities, engine.invoke_routed,
                              engine.remote, engine.step_metrics)
    server = await RuntimeServer.start(engine, "127.0.0.1:0", feedback=feedback,
                                       planner=planner)
    try:
        yield Served(engine, feedback, planner, server)
    finally:
        await server.stop(grace=0)
        await engine.aclose()
        await planner.aclose()
        await planning.aclose()
        await feedback.aclose()


async def test_plan_then_plan_and_execute_with_progress_and_feedback(served: Served) -> None:
    async with RuntimeClient(served.address) as client:
        planned = await client.plan(INTENT, {"text": TEXT})
        assert planned["planner"] == "builtin" and not planned["executed"]
        assert planned["plan"]["kind"] == "Capability"
        assert [s["capability"] for s in planned["explanation"]["steps"]] == [
            "summarize-text", "translate-text"]
        events: list[ProgressEvent] = []
        ran = await client.plan_and_execute(INTENT, {"text": TEXT}, on_progress=events.append)
        assert ran["results"] == {"translation": "le chat est sur le tapis.", "language": "fr"}
        assert ran["trace"]["outcome"] == "OK" and len(ran["trace"]["steps"]) == 2
        assert [e.message for e in events][-1] == "translate-text: done"
        assert events[-1].fraction == 1.0
        # `packetflow feedback TRACE_ID` finds the planner by the trace id alone.
        assert await client.feedback(ran["traceId"], 0.0) == "planner"
        assert await served.feedback.store.scores([ran["traceId"]]) == {ran["traceId"]: 0.0}
        # The cached plan its run left behind is condemned by that rating.
        again = await client.plan(INTENT, {"text": TEXT})
        assert again["planner"] == "builtin"


async def test_refusals_over_grpc_name_the_problem(served: Served) -> None:
    async with RuntimeClient(served.address) as client:
        with pytest.raises(CallError) as empty:
            await client.plan("  ", {})
        assert empty.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in empty.value.violations] == ["intent"]
        with pytest.raises(CallError) as nothing:
            await client.plan_and_execute("book a flight to Paris", {})
        assert nothing.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "no capability covers 'book', 'flight'" in nothing.value.message
        held = await client.plan_and_execute("send this text by email to the given address",
                                              {"text": "hi", "to": "bob@example.com"})
        assert not held["executed"] and "send-email (email)" in held["blocked"]


async def test_a_failing_plan_reports_its_error_and_trace(served: Served) -> None:
    async with RuntimeClient(served.address) as client:
        # average of no numbers: the handler fails; the plan and its trace still come back.
        ran = await client.plan_and_execute("compute the mean of these numbers",
                                            {"numbers": []})
    assert ran["executed"] and ran["error"]["code"] == "INTERNAL"
    assert ran["trace"]["outcome"] == "INTERNAL"
    outcomes = await served.planner.store.outcomes(["average-numbers"])  # type: ignore[union-attr]
    assert outcomes[0].failed == "average-numbers" and not outcomes[0].ok


async def test_the_planner_kind_serves_intent_to_plan_and_results(served: Served) -> None:
    async with RuntimeClient(served.address) as client:
        output = await client.invoke("do-it", {"intent": INTENT, "input": {"text": TEXT}})
        assert output["results"] == {"translation": "le chat est sur le tapis.",
                                     "language": "fr"}
        assert output["plan"]["spec"]["implementation"]["composition"]["steps"][0]["call"][
            "capability"] == "summarize-text"
        with pytest.raises(CallError) as narrowed:  # only its three capabilities
            await client.invoke("do-it", {"intent": "reverse this text",
                                          "input": {"text": "abc"}})
        assert narrowed.value.code == grpc.StatusCode.FAILED_PRECONDITION
        listed = {c.name: c.implementation for c in await client.list()}
        assert listed["do-it"] == "planner"


def test_a_planner_manifest_with_a_bad_contract_is_a_load_error() -> None:
    bad = PLANNER_MANIFEST.replace("intent: {type: string}", "question: {type: string}")
    engine = Engine([*registry(), *load_text(bad).capabilities])
    assert [(e.source, e.path) for e in engine.load_errors] == [
        ("capability do-it", "spec.requires")]


async def test_mcp_tools_plan_execute_and_feedback(served: Served) -> None:
    service = McpService.for_engine(served.engine)
    for source in planner_source(served.planner, served.feedback, served.engine.traces):
        service.add_source(source)
    progress: list[str | None] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(message)

    async with Client(service.server) as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
        assert {"plan", "plan_and_execute", "feedback"} <= names
        planned = await client.call_tool("plan", {"intent": INTENT, "input": {"text": TEXT}})
        assert not planned.is_error and planned.structured_content is not None
        assert planned.structured_content["executed"] is False
        ran = await client.call_tool("plan_and_execute",
                                     {"intent": INTENT, "input": {"text": TEXT}},
                                     progress_callback=on_progress)
        assert ran.structured_content is not None
        assert ran.structured_content["results"]["language"] == "fr"
        assert "translate-text: done" in progress
        rated = await client.call_tool("feedback", {
            "trace_id": ran.structured_content["traceId"], "score": 1.0})
        assert rated.structured_content == {"capability": "planner"}
        bad = await client.call_tool("feedback", {"trace_id": "t", "score": 7})
        assert bad.is_error and "input.score" in bad.content[0].text  # type: ignore[union-attr]
        empty = await client.call_tool("plan", {"intent": ""})
        assert empty.is_error and "intent" in empty.content[0].text  # type: ignore[union-attr]


async def test_outcomes_and_cache_shared_in_postgresql(postgres_dsn: str) -> None:
    first = await postgres_store(postgres_dsn)
    second = await postgres_store(postgres_dsn)  # another replica
    try:
        engine = Engine(registry())
        planner = Planner(engine.capabilities, engine.invoke, store=first,
                          settings=PlannerSettings(embeddings=False))
        result = await planner.plan_and_execute(PlanRequest("reverse this text",
                                                            {"text": "abc"}),
                                                CallContext(capability="p", trace_id="pg1"))
        assert result.results == {"text": "cba"}
        assert [o.trace_id for o in await second.outcomes(["reverse-text"])] == ["pg1"]
        other = Planner(engine.capabilities, engine.invoke, store=second,
                        settings=PlannerSettings(embeddings=False))
        assert (await other.plan(PlanRequest("reverse this text", {"text": "xyz"}))
                ).plan.planner == "cache"
        await second.record(Outcome("pg2", ("x",), ("a", "b"), False, "b", 1.0, 2.0))
        assert [o.capabilities for o in await first.outcomes(["b"])] == [("a", "b")]
        await engine.aclose()
    finally:
        await first.aclose()
        await second.aclose()
