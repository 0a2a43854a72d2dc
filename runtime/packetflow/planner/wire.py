"""Plans on the wire: ``PlanRequest``/``PlanResponse`` protobuf to and from the core."""

from __future__ import annotations

import orjson

from packetflow.errors import FieldViolation, InvalidInput, code_of
from packetflow.planner.core import PlanRequest, PlanResult
from packetflow.v1 import runtime_pb2


def request_from_proto(request: runtime_pb2.PlanRequest) -> PlanRequest:
    """The core's request; input that is not JSON is InvalidInput naming ``input``."""
    try:
        data = orjson.loads(request.input_json) if request.input_json else {}
    except orjson.JSONDecodeError as exc:
        raise InvalidInput([FieldViolation("input", f"not valid JSON: {exc}")]) from None
    return PlanRequest(request.intent, data, allow_effects=request.allow_effects,
                       capabilities=tuple(request.capabilities),
                       planner=request.planner or "auto", use_cache=not request.no_cache)


def response_to_proto(result: PlanResult) -> runtime_pb2.PlanResponse:
    """The wire form of a plan (and of its execution, if it ran)."""
    response = runtime_pb2.PlanResponse(
        plan_json=orjson.dumps(result.plan.manifest),
        explanation_json=orjson.dumps(result.explanation), planner=result.plan.planner,
        blocked=result.blocked, executed=result.executed, trace_id=result.trace_id)
    if result.results is not None:
        response.results_json = orjson.dumps(result.results)
    if result.trace is not None:
        response.trace_json = orjson.dumps(result.trace)
    if result.error is not None:
        response.error_code = code_of(result.error).value
        response.error_message = result.error.message
    return response
