"""The planner as MCP tools: ``plan``, ``plan_and_execute`` and ``feedback``.

``plan_and_execute`` streams the plan's progress as MCP progress notifications; its result
carries the trace id that ``feedback`` (the MCP face of ``packetflow feedback``) rates.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from packetflow.context import CallContext
from packetflow.contracts import CompiledContract, contract_schema
from packetflow.errors import InvalidInput, NotServable
from packetflow.feedback import FeedbackService, RecentTraces
from packetflow.mcp.tools import NamedTool, ResourceEntry, TemplateEntry, ToolEntry, ToolRunner
from packetflow.planner.core import Planner, PlanRequest
from packetflow.planner.handler import PLANNER_NAME
from packetflow.spec import Contract, FieldSchema

PLAN_INPUT: Contract = {
    "intent": FieldSchema(type="string", description="What you want done, in a sentence"),
    "input": FieldSchema(type="object", default={},
                         description="The data to work on; its field names and types shape "
                                     "the plan"),
    "allow_effects": FieldSchema(type="boolean", default=False,
                                 description="Allow capabilities with side effects to run"),
    "capabilities": FieldSchema.model_validate({
        "type": "array", "items": {"type": "string"}, "default": [],
        "description": "Only these capabilities may be used (default: all)"}),
}
PLAN_OUTPUT: Contract = {
    "plan": FieldSchema(type="object", description="A Capability manifest (a composition)"),
    "planner": FieldSchema(type="string"),
    "explanation": FieldSchema(type="object"),
    "executed": FieldSchema(type="boolean"),
    "blocked": FieldSchema(type="string", optional=True),
    "results": FieldSchema(type=["object", "null"], optional=True),
    "trace": FieldSchema(type=["object", "null"], optional=True),
    "traceId": FieldSchema(type="string", optional=True),
    "error": FieldSchema(type="object", optional=True),
}
FEEDBACK_INPUT: Contract = {
    "trace_id": FieldSchema(type="string", description="The traceId of a result"),
    "score": FieldSchema.model_validate({
        "type": "number", "minimum": 0, "maximum": 1,
        "description": "0 (not at all) .. 1 (fully satisfied)"}),
    "capability": FieldSchema(type="string", default="",
                              description="Default: the capability that served the trace"),
    "comment": FieldSchema(type="string", default=""),
}
FEEDBACK_OUTPUT: Contract = {"capability": FieldSchema(type="string")}


@dataclass
class PlannerSource:
    """Tools of the planner (and of feedback, when the runtime keeps it)."""

    planner: Planner
    feedback: FeedbackService | None = None
    traces: RecentTraces | None = None

    def version(self) -> object:
        """These tools never change."""
        return self

    def tools(self) -> Iterable[NamedTool]:
        """``plan``, ``plan_and_execute`` and ``feedback``."""
        yield self._tool("plan", "Turn an intent into a checked plan (a composition of the "
                         "capabilities here) and say why; nothing runs.", PLAN_INPUT,
                         self._plan(execute=False))
        yield self._tool("plan_and_execute", "Plan an intent and run the plan (capabilities "
                         "with effects only with allow_effects); progress is reported.",
                         PLAN_INPUT, self._plan(execute=True))
        if self.feedback is not None:
            yield self._tool("feedback", "Rate a result (by its traceId) from 0 to 1: the "
                             "planner learns which capabilities to prefer.", FEEDBACK_INPUT,
                             self._feedback, FEEDBACK_OUTPUT)

    @staticmethod
    def _tool(name: str, description: str, contract: Contract, run: ToolRunner,
              output: Contract = PLAN_OUTPUT) -> NamedTool:
        checker = CompiledContract.compile(contract)

        async def checked(arguments: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
            value, violations = checker.check(arguments, "input")
            if violations:
                raise InvalidInput(violations)
            return await run(value, ctx)

        def build(tool_name: str) -> ToolEntry:
            return ToolEntry(tool_name, description, contract_schema(contract),
                             contract_schema(output), PLANNER_NAME, checked)

        return NamedTool(name, True, build)

    def _plan(self, execute: bool) -> ToolRunner:
        async def run(arguments: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
            request = PlanRequest(arguments["intent"], arguments["input"],
                                  allow_effects=arguments["allow_effects"],
                                  capabilities=tuple(arguments["capabilities"]))
            if not execute:
                return (await self.planner.plan(request)).as_dict()
            if self.traces is not None:
                self.traces.served(ctx.trace_id, PLANNER_NAME)
            return (await self.planner.plan_and_execute(request, ctx)).as_dict()

        return run

    async def _feedback(self, arguments: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        if self.feedback is None:
            raise NotServable("this runtime keeps no feedback")
        record = await self.feedback.record(arguments["trace_id"], arguments["score"],
                                            arguments["capability"], arguments["comment"])
        return {"capability": record.capability}

    def resources(self) -> Iterable[ResourceEntry]:
        """None."""
        return ()

    def templates(self) -> Iterable[TemplateEntry]:
        """None."""
        return ()

    async def read(self, uri: str) -> str | None:
        """Nothing to read."""
        return None


def planner_source(planner: Planner | None, feedback: FeedbackService | None,
                   traces: RecentTraces | None) -> list[PlannerSource]:
    """The source to add when the runtime has a planner (none otherwise)."""
    return [] if planner is None else [PlannerSource(planner, feedback, traces)]


__all__ = ["PlannerSource", "planner_source"]
