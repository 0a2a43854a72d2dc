"""The composition executor alone: traces, child contexts, joins, reducers, with plain async
functions as the capabilities it calls (the engine-level behaviour is in test_composition.py)."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from packetflow.composition.executor import TRACE_METADATA_KEY, composition_handler, trace_of
from packetflow.composition.metrics import StepMetrics
from packetflow.composition.model import CompositionSpec, parse_composition
from packetflow.context import CallContext
from packetflow.errors import (
    DeadlineExceeded,
    FieldViolation,
    InvalidInput,
    PacketFlowError,
    Unavailable,
)
from tests.conftest import eventually


class Capabilities:
    """``invoke`` and ``remote`` for the executor: each call recorded with its context."""

    def __init__(self) -> None:
        self.calls: list[tuple[str | None, str, Any, CallContext]] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.failures: dict[str, PacketFlowError | Exception] = {}

    async def invoke(self, name: str, value: Any, ctx: CallContext) -> dict[str, Any]:
        self.calls.append((None, name, value, ctx))
        if name in self.gates:
            await self.gates[name].wait()
        if name in self.failures:
            raise self.failures[name]
        await asyncio.sleep(0.002)  # the capability's work: some time passes in each step
        if name == "inc":
            return {"x": value["x"] + 1}
        if name == "nested":  # a composition underneath leaves its own trace
            ctx.metadata[TRACE_METADATA_KEY] = '{"composition": "nested", "steps": []}'
        return {"got": value}

    async def remote(self, address: str, name: str, value: Any,
                     ctx: CallContext) -> dict[str, Any]:
        self.calls.append((address, name, value, ctx))
        return {"far": value}


def spec(composition: dict[str, Any]) -> CompositionSpec:
    parsed = parse_composition(composition)
    assert isinstance(parsed, CompositionSpec), parsed
    return parsed


async def run(composition: dict[str, Any], value: dict[str, Any], caps: Capabilities,
              timeout: float | None = None, **options: Any) -> tuple[Any, dict[str, Any]]:
    """Run; return the output (or the error raised) and the trace."""
    handler = composition_handler(spec(composition), caps.invoke, caps.remote, name="flow",
                                  **options)
    deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
    ctx = CallContext(capability="flow", trace_id="t-1", caller="me", deadline=deadline,
                      progress_sink=print)
    try:
        output: Any = await handler(value, ctx)
    except PacketFlowError as exc:
        output = exc
    trace = trace_of(ctx)
    assert trace is not None
    return output, trace


def is_ms(value: Any) -> bool:
    """A duration in milliseconds as the trace gives it: a float rounded to microseconds."""
    return isinstance(value, float) and value >= 0 and round(value, 3) == value


async def test_trace_records_each_step_and_child_contexts_carry_the_call() -> None:
    caps = Capabilities()
    output, trace = await run({"steps": [
        {"name": "first", "call": {"capability": "inc", "input": {"x": "input.x"}},
         "output": "{y: result.x}"},
        {"name": "second", "call": {"capability": "far", "address": "peer:1"}},
        {"name": "third", "call": {"capability": "inc", "input": {"x": "steps.first.y"}}},
        {"name": "fourth", "call": {"capability": "nested"}},
    ]}, {"x": 1}, caps, timeout=60)
    assert output == {"got": {"x": 3}}
    assert [(a, n, v) for a, n, v, _ in caps.calls] == [
        (None, "inc", {"x": 1}), ("peer:1", "far", {"y": 2}), (None, "inc", {"x": 2}),
        (None, "nested", {"x": 3})]
    deadline = caps.calls[0][3].deadline
    assert deadline is not None
    for _, name, _, ctx in caps.calls:
        assert (ctx.capability, ctx.trace_id, ctx.caller) == (name, "t-1", "me")
        assert ctx.deadline == deadline and ctx.progress_sink is print

    assert set(trace) == {"composition", "traceId", "outcome", "durationMs", "steps"}
    assert (trace["composition"], trace["traceId"], trace["outcome"]) == ("flow", "t-1", "OK")
    steps = trace["steps"]
    assert [{k: v for k, v in s.items() if k not in ("startedMs", "durationMs")}
            for s in steps] == [
        {"path": "steps[0]", "name": "first", "kind": "call", "attempts": 1, "outcome": "OK",
         "capability": "inc", "inputFields": ["x"]},
        {"path": "steps[1]", "name": "second", "kind": "call", "attempts": 1, "outcome": "OK",
         "capability": "far", "inputFields": ["y"], "address": "peer:1"},
        {"path": "steps[2]", "name": "third", "kind": "call", "attempts": 1, "outcome": "OK",
         "capability": "inc", "inputFields": ["x"]},
        {"path": "steps[3]", "name": "fourth", "kind": "call", "attempts": 1, "outcome": "OK",
         "capability": "nested", "inputFields": ["x"],
         "trace": {"composition": "nested", "steps": []}},
    ]
    # Times in milliseconds from the start of the call: steps run one after the other.
    assert all(is_ms(s["startedMs"]) and is_ms(s["durationMs"]) for s in steps)
    assert is_ms(trace["durationMs"])
    for before, after in itertools.pairwise(steps):
        assert after["startedMs"] >= before["startedMs"] + before["durationMs"] - 0.002
    assert steps[0]["durationMs"] >= 1.0  # the capability's 2 ms of work
    assert trace["durationMs"] >= steps[-1]["startedMs"] + steps[-1]["durationMs"] - 0.002
    assert trace["durationMs"] < 600_000  # a duration, not a clock reading


async def test_failed_steps_record_their_code_and_error() -> None:
    caps = Capabilities()
    caps.failures["bad"] = InvalidInput([FieldViolation("a", "must be an integer")])
    error, trace = await run({"steps": [{"name": "s", "call": {"capability": "bad"}}]}, {},
                             caps)
    assert isinstance(error, InvalidInput)
    assert error.message.startswith("step 's': ")
    assert [(v.field, v.description) for v in error.violations] == [
        ("steps.s.a", "must be an integer")]
    assert trace["outcome"] == "INVALID_ARGUMENT"
    assert (trace["steps"][0]["outcome"], trace["steps"][0]["error"]) == (
        "INVALID_ARGUMENT", error.message)
    caps.failures["bad"] = ValueError("a bug")
    ctx = CallContext(capability="flow", trace_id="t-2")
    handler = composition_handler(spec({"steps": [{"call": {"capability": "bad"}}]}),
                                  caps.invoke)
    with pytest.raises(ValueError):
        await handler({}, ctx)
    crashed = trace_of(ctx)
    assert crashed is not None and crashed["composition"] == "composition"  # the default
    assert (crashed["steps"][0]["outcome"], crashed["steps"][0]["error"]) == (
        "INTERNAL", "ValueError")
    # A remote step needs a remote caller.
    handler = composition_handler(spec({"steps": [{"name": "r", "call": {
        "capability": "x", "address": "h:1"}}]}), caps.invoke)
    with pytest.raises(PacketFlowError) as caught:
        await handler({}, CallContext(capability="flow", trace_id="t-3"))
    assert caught.value.message == ("step 'r': calls 'x' at h:1, but this runtime has no "
                                    "remote caller")  # the step named once


async def test_trace_keeps_at_most_max_steps_and_counts_the_rest() -> None:
    steps = {"steps": [{"name": f"s{i}", "call": {"capability": "echo"}} for i in range(3)]}
    _, full = await run(steps, {}, Capabilities(), max_trace_steps=3)
    assert len(full["steps"]) == 3 and "droppedSteps" not in full
    _, cut = await run(steps, {}, Capabilities(), max_trace_steps=1)
    assert [s["name"] for s in cut["steps"]] == ["s0"] and cut["droppedSteps"] == 2


def test_no_trace_without_a_composition() -> None:
    assert trace_of(CallContext(capability="x", trace_id="t")) is None


async def test_trace_paths_of_nested_steps() -> None:
    _, trace = await run({"steps": [
        {"conditional": {"when": [{"if": "input.go", "then": {"call": {"capability": "a"}}}],
                         "else": {"call": {"capability": "b"}}}},
        {"conditional": {"when": [{"if": "input.stop", "then": {"call": {"capability": "a"}}}],
                         "else": {"call": {"capability": "b"}}}},
        {"mapReduce": {"over": "input.xs", "map": {"call": {"capability": "c"}},
                       "reduce": "count"}},
        {"name": "p", "pipeline": [{"call": {"capability": "d"}}]},
    ]}, {"go": True, "stop": False, "xs": [1, 2]}, Capabilities())
    assert sorted(s["path"] for s in trace["steps"]) == [
        "steps[0]", "steps[0].conditional.when[0].then", "steps[1]",
        "steps[1].conditional.else", "steps[2]", "steps[2].mapReduce.map[0]",
        "steps[2].mapReduce.map[1]", "steps[3]", "steps[3].pipeline[0]"]
    assert {s["kind"] for s in trace["steps"]} == {"conditional", "call", "mapReduce",
                                                  "pipeline"}
    assert [s["name"] for s in trace["steps"] if s["kind"] == "pipeline"] == ["p"]


async def test_nested_steps_see_the_earlier_steps_and_reducers_leave_no_trace() -> None:
    caps = Capabilities()
    output, _ = await run({"steps": [
        {"name": "first", "call": {"capability": "inc", "input": {"x": "input.x"}}},
        {"pipeline": [{"call": {"capability": "e", "input": {"v": "steps.first.x"}}}]},
        {"mapReduce": {"over": "input.xs", "map": {"call": {"capability": "e"}},
                       "reduce": {"capability": "nested"}}},
    ]}, {"x": 1, "xs": [1]}, caps)
    assert [v for _, n, v, _ in caps.calls if n == "e"] == [{"v": 2}, 1]
    assert output == {"got": {"items": [{"got": 1}]}}


async def test_map_items_are_the_last_output_and_reducers_get_them_in_order() -> None:
    caps = Capabilities()
    output, _ = await run({"steps": [
        {"call": {"capability": "echo"}},
        {"mapReduce": {"over": "input.xs", "item": "x", "map": {"call": {"capability": "e"}},
                       "reduce": {"capability": "sum-up", "address": "peer:2"}}},
    ]}, {"xs": [1, 2]}, caps)
    # A call without input passes `last` on: in a map, the item.
    assert [v for _, n, v, _ in caps.calls if n == "e"] == [1, 2]
    assert caps.calls[-1][:3] == ("peer:2", "sum-up", {"items": [{"got": 1}, {"got": 2}]})
    assert output == {"far": {"items": [{"got": 1}, {"got": 2}]}}


@pytest.mark.parametrize(("over", "named"), [("input.n", "int"), ("input.none", "null")])
async def test_map_over_a_non_list_names_what_it_got(over: str, named: str) -> None:
    error, _ = await run({"steps": [{"name": "m", "mapReduce": {
        "over": over, "map": {"call": {"capability": "e"}}}}]}, {"n": 1}, Capabilities())
    assert isinstance(error, InvalidInput)
    assert [(v.field, v.description) for v in error.violations] == [
        ("steps.m.over", f"must yield a list, got {named}")]


async def test_sum_adds_numbers_only() -> None:
    output, _ = await run({"steps": [{"mapReduce": {
        "over": "input.xs", "map": {"call": {"capability": "pick", "input": {"v": "item"}}},
        "reduce": "sum"}}]}, {"xs": [1, True, 2.5, "x"]},
        _Picks())
    assert output == {"v": 3.5, "n": 1}  # True is not a number; "x" adds nothing


class _Picks(Capabilities):
    async def invoke(self, name: str, value: Any, ctx: CallContext) -> dict[str, Any]:
        return value if isinstance(value["v"], int | float) else {"v": value["v"], "n": 1}


async def test_first_n_join_survives_a_failure_and_any_reports_the_first() -> None:
    caps = Capabilities()
    caps.failures["fails"] = Unavailable("one")
    caps.gates = {"a": asyncio.Event(), "c": asyncio.Event()}
    branches = {"a": {"call": {"capability": "a"}}, "b": {"call": {"capability": "fails"}},
                "c": {"call": {"capability": "c"}}}
    running = asyncio.create_task(run({"steps": [{"parallel": {
        "branches": branches, "join": {"first": 2}}}]}, {}, caps))
    await eventually(lambda: len(caps.calls) == 3, what="three branches")
    caps.gates["a"].set()
    caps.gates["c"].set()
    output, _ = await running
    assert output == {"a": {"got": {}}, "c": {"got": {}}}

    caps = Capabilities()
    caps.failures = {"fails": Unavailable("one"), "later": Unavailable("two")}
    caps.gates = {"later": asyncio.Event()}
    running = asyncio.create_task(run({"steps": [{"parallel": {"join": "any", "branches": {
        "x": {"call": {"capability": "fails"}},
        "y": {"call": {"capability": "later"}}}}}]}, {}, caps))
    await eventually(lambda: len(caps.calls) == 2, what="both branches")
    caps.gates["later"].set()
    error, _ = await running
    assert isinstance(error, Unavailable) and "one" in error.message


async def test_branch_deadlines_are_the_earlier_of_limit_and_caller() -> None:
    caps = Capabilities()
    await run({"steps": [{"parallel": {"timeoutSeconds": 100, "branches": {
        "a": {"call": {"capability": "a"}}}}}]}, {}, caps, timeout=5)
    await run({"steps": [{"parallel": {"timeoutSeconds": 5, "branches": {
        "a": {"call": {"capability": "a"}}}}}]}, {}, caps, timeout=100)
    await run({"steps": [{"parallel": {"timeoutSeconds": 5, "branches": {
        "a": {"call": {"capability": "a"}}}}}]}, {}, caps)
    now = asyncio.get_running_loop().time()
    remaining = [ctx.deadline - now for *_, ctx in caps.calls if ctx.deadline is not None]
    assert len(remaining) == 3 and all(0 < r <= 5 for r in remaining)
    # A branch keeps the frame's callables: remote steps, retries (their jitter and wait)
    # and metrics work inside it.
    caps.failures["flaky"] = Unavailable("once")
    registry = CollectorRegistry()
    slept: list[float] = []

    async def sleep(delay: float) -> None:
        slept.append(delay)
        caps.failures.pop("flaky", None)

    output, _ = await run({"steps": [{"parallel": {"timeoutSeconds": 50, "branches": {
        "r": {"call": {"capability": "far", "address": "peer:3"}},
        "f": {"name": "f", "call": {"capability": "flaky"},
              "retry": {"maxAttempts": 2, "backoffSeconds": 1, "jitter": 0.5}}}}}]},
        {}, caps, timeout=100, metrics=StepMetrics(registry), rng=lambda: 1.0, sleep=sleep)
    assert output == {"r": {"far": {}}, "f": {"got": {}}}
    assert slept == [0.5]
    assert registry.get_sample_value("packetflow_step_attempts_total",
                                     {"composition": "flow", "step": "f"}) == 2


async def test_a_branch_past_its_limit_is_named() -> None:
    caps = Capabilities()
    caps.gates = {"stuck": asyncio.Event()}
    error, _ = await asyncio.wait_for(run({"steps": [{"name": "p", "parallel": {
        "timeoutSeconds": 0.5, "branches": {"s": {"call": {"capability": "stuck"}}}}}]},
        {}, caps), 30)
    assert isinstance(error, DeadlineExceeded)
    assert error.message == "branch 's' of step 'p' did not finish within 0.5s"


async def test_a_failed_item_fails_the_map_and_a_failed_reducer_is_named() -> None:
    caps = Capabilities()
    caps.failures["bad"] = Unavailable("item down")
    caps.gates = {"slow": asyncio.Event()}
    mapping = {"over": "input.xs", "concurrency": 2,
               "map": {"call": {"capability": "item", "input": {"kind": "item"}}}}
    picks = _Routed(caps, lambda value: "bad" if value["kind"] == "bad" else "slow")
    error, _ = await run({"steps": [{"name": "m", "mapReduce": mapping}]},
                         {"xs": ["slow", "bad"]}, picks)
    assert isinstance(error, Unavailable) and "item down" in error.message
    caps.failures["sum-up"] = Unavailable("reducer down")
    error, _ = await run({"steps": [{"name": "m", "mapReduce": {
        "over": "input.xs", "map": {"call": {"capability": "e"}},
        "reduce": {"capability": "sum-up"}}}]}, {"xs": [1]}, caps)
    assert isinstance(error, Unavailable)
    assert error.message == "step 'm.reduce': reducer down"


class _Routed(Capabilities):
    """Calls go to the capability ``route(input)`` names, with ``caps``' failures and gates."""

    def __init__(self, caps: Capabilities, route: Any) -> None:
        super().__init__()
        self.caps, self.route = caps, route

    async def invoke(self, name: str, value: Any, ctx: CallContext) -> dict[str, Any]:
        return await self.caps.invoke(self.route(value), value, ctx)


async def test_sum_skips_outputs_that_are_not_objects() -> None:
    output, _ = await run({"steps": [{"mapReduce": {
        "over": "input.xs", "map": {"call": {"capability": "e"}, "output": "result.got"},
        "reduce": "sum"}}]}, {"xs": [1, 2]}, Capabilities())
    assert output == {}


async def test_a_caller_deadline_ends_a_branch_with_a_long_limit() -> None:
    caps = Capabilities()
    caps.gates = {"stuck": asyncio.Event()}
    error, _ = await asyncio.wait_for(run({"steps": [{"parallel": {
        "timeoutSeconds": 3600, "branches": {"s": {"call": {"capability": "stuck"}}}}}]},
        {}, caps, timeout=0.5), 30)
    assert isinstance(error, DeadlineExceeded)
