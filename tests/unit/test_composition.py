"""Compositions: the model and load-time checks, and every pattern run by a real Engine."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from packetflow.composition.check import (
    CheckError,
    check_composition,
    check_compositions,
    composition_of,
)
from packetflow.composition.cron import Cron
from packetflow.composition.executor import composition_handler, trace_of
from packetflow.composition.metrics import StepMetrics
from packetflow.composition.model import CompositionSpec, parse_composition
from packetflow.composition.triggers import (
    PostgresIdempotencyStore,
    SqliteIdempotencyStore,
    TriggerRunner,
)
from packetflow.context import CallContext, Handler
from packetflow.engine import Engine
from packetflow.errors import (
    Code,
    DeadlineExceeded,
    InvalidInput,
    PacketFlowError,
    Unavailable,
    code_of,
)
from packetflow.manifests import load_text
from packetflow.spec import Capability
from tests.conftest import eventually

pytest_plugins = ["tests.support.postgres"]

# Leaf capabilities. Those with `builtin: echo` get a test handler swapped in (see `build`).
LEAVES = """
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: add}
spec:
  intent: Add two integers
  requires: {a: {type: integer}, b: {type: integer, default: 0}}
  provides: {sum: {type: integer}}
  implementation: {builtin: {name: transform, config: {expression: "{sum: sum([a, b])}"}}}
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: greet}
spec:
  intent: Greet
  requires: {name: {type: string}}
  provides: {text: {type: string}}
  implementation: {builtin: {name: template, config: {template: "hello $name"}}}
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: echo}
spec:
  intent: Echo anything
  implementation: {builtin: {name: echo}}
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: total}
spec:
  intent: Sum the items' sums
  requires: {items: {type: array}}
  provides: {total: {type: integer}}
  implementation: {builtin: {name: transform, config: {expression: "{total: sum(items[].sum)}"}}}
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: probe}
spec:
  intent: A test handler is swapped in
  implementation: {builtin: {name: echo}}
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: quick}
spec:
  intent: A test handler with a short per-call timeout
  implementation: {builtin: {name: echo}}
  timeoutSeconds: 0.2
"""


def composition_manifest(name: str, composition: str, extra: str = "") -> str:
    """A Capability manifest whose implementation is the given composition (YAML)."""
    composition = textwrap.indent(textwrap.dedent(composition).strip(), " " * 6)
    return f"""
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {{name: {name}}}
spec:
  intent: A composition
  {extra}
  implementation:
    composition:
{composition}
"""


def load(text: str) -> list[Capability]:
    loaded = load_text(LEAVES + text, "test")
    assert not loaded.errors, loaded.errors
    return loaded.capabilities


def build(text: str, handlers: dict[str, Handler] | None = None,
          metrics: StepMetrics | None = None) -> Engine:
    """A real Engine; compositions get composition handlers, test handlers are swapped in."""
    capabilities = load(text)
    engine = Engine(capabilities)
    for name, handler in (handlers or {}).items():
        engine.served[name].handler = handler
    for cap in capabilities:
        spec = composition_of(cap)
        if spec is not None:
            engine.served[cap.name].handler = composition_handler(
                spec, engine.invoke, name=cap.name, metrics=metrics, rng=lambda: 0.5)
    return engine


def context(name: str = "flow", timeout: float | None = None) -> CallContext:
    deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
    return CallContext(capability=name, trace_id="trace-1", caller="tests", deadline=deadline)


async def run(engine: Engine, value: dict[str, Any], name: str = "flow",
              timeout: float | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Invoke the composition; return its output and its trace."""
    ctx = context(name, timeout)
    output = await engine.invoke(name, value, ctx)
    trace = trace_of(ctx)
    assert trace is not None
    return output, trace


async def fails(engine: Engine, value: dict[str, Any], name: str = "flow",
                timeout: float | None = None) -> tuple[PacketFlowError, dict[str, Any]]:
    """Invoke expecting a domain error; return it and the trace."""
    ctx = context(name, timeout)
    with pytest.raises(PacketFlowError) as caught:
        await engine.invoke(name, value, ctx)
    trace = trace_of(ctx)
    assert trace is not None
    return caught.value, trace


class Probe:
    """A handler that counts calls, can fail its first calls, and can wait for a gate."""

    def __init__(self, failures: list[PacketFlowError] | None = None,
                 gate: asyncio.Event | None = None,
                 respond: Callable[[dict[str, Any]], dict[str, Any]] = dict) -> None:
        self.failures = list(failures or [])
        self.gate = gate
        self.respond = respond
        self.calls: list[dict[str, Any]] = []
        self.contexts: list[CallContext] = []
        self.cancelled = 0
        self.in_flight = 0
        self.max_in_flight = 0

    async def __call__(self, value: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        self.calls.append(value)
        self.contexts.append(ctx)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.failures:
                raise self.failures.pop(0)
            if self.gate is not None:
                await self.gate.wait()
            for _ in range(3):  # yield, so concurrent calls overlap
                await asyncio.sleep(0)
            return self.respond(value)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1


def never_set() -> asyncio.Event:
    return asyncio.Event()


# ============================================================================ model

@pytest.mark.parametrize(("data", "path", "fragment"), [
    ({"steps": [{"call": {"capability": "add"}},
                {"call": {"capability": "add", "input": {"a": "steps.add.[sum"}}}]},
     "spec.implementation.composition.steps[1].call.input.a", "invalid JMESPath expression"),
    ({"steps": [{"conditional": {"when": [{"if": "a ==",
                                           "then": {"call": {"capability": "x"}}}]}}]},
     "spec.implementation.composition.steps[0].conditional.when[0].if", "invalid JMESPath"),
    ({"steps": [{"mapReduce": {"over": "input.xs[", "map": {"call": {"capability": "x"}}}}]},
     "spec.implementation.composition.steps[0].mapReduce.over", "invalid JMESPath"),
    ({"steps": [{"call": {"capability": "x"}, "pipeline": [{"call": {"capability": "y"}}]}]},
     "spec.implementation.composition.steps[0]", "exactly one of call, pipeline"),
    ({"steps": [{"call": {"capability": "x", "retries": 3}}]},
     "spec.implementation.composition.steps[0].call.retries", "unknown field"),
    ({"steps": [{"parallel": {"branches": {"a": {"call": {"capability": "x"}}}, "join": 3}}]},
     "spec.implementation.composition.steps[0].parallel.join", "must be all, any or {first: N}"),
    ({"steps": [{"parallel": {"branches": {"a": {"call": {"capability": "x"}}},
                              "optional": ["b"]}}]},
     "spec.implementation.composition.steps[0].parallel", "unknown branch 'b'"),
    ({"steps": [{"mapReduce": {"over": "input.xs", "map": {"call": {"capability": "x"}},
                               "reduce": "avg"}}]},
     "spec.implementation.composition.steps[0].mapReduce.reduce", "'collect', 'sum'"),
    ({"steps": [{"name": "a", "call": {"capability": "x"}},
                {"name": "a", "call": {"capability": "y"}}]},
     "spec.implementation.composition", "step name 'a' is used twice"),
    ({"steps": [{"call": {"capability": "x"}, "retry": {"maxAttempts": 0}}]},
     "spec.implementation.composition.steps[0].retry.maxAttempts", "greater than or equal"),
])
def test_bad_composition_is_rejected_naming_step_and_field(
        data: dict[str, Any], path: str, fragment: str) -> None:
    errors = parse_composition(data)
    assert isinstance(errors, list)
    assert [p for p, _ in errors] == [path], errors
    assert fragment in errors[0][1]


def test_composition_parses_every_pattern() -> None:
    spec = parse_composition({
        "steps": [
            {"name": "first", "call": {"capability": "add", "input": {"a": "input.a"}},
             "retry": {"maxAttempts": 2, "backoffSeconds": 0, "jitter": 0}},
            {"parallel": {"branches": {"x": {"pipeline": [{"call": {"capability": "echo"}}]},
                                       "y": {"call": {"capability": "echo",
                                                      "address": "10.0.0.1:50051"}}},
                          "join": {"first": 1}, "timeoutSeconds": 1, "optional": ["y"]}},
            {"conditional": {"when": [{"if": "input.a", "then": {"call": {"capability": "x"}}}],
                             "else": {"call": {"capability": "y"}}}},
            {"mapReduce": {"over": "input.xs", "item": "x", "concurrency": 2,
                           "map": {"call": {"capability": "add", "input": {"a": "x"}}},
                           "reduce": {"capability": "total"}}},
        ],
        "output": "steps.first",
    })
    assert isinstance(spec, CompositionSpec)
    assert [s.kind for s in spec.steps] == ["call", "parallel", "conditional", "mapReduce"]
    assert [s.label for s in spec.steps] == ["first", "parallel", "conditional", "mapReduce"]


def test_item_name_may_not_shadow_the_scope() -> None:
    errors = parse_composition({"steps": [{"mapReduce": {
        "over": "input.xs", "item": "steps", "map": {"call": {"capability": "x"}}}}]})
    assert isinstance(errors, list)
    assert errors[0][0] == "spec.implementation.composition.steps[0].mapReduce"
    assert "shadow" in errors[0][1]


# ============================================================================ checks

def check(composition: str, extra: str = "") -> list[CheckError]:
    errors = check_compositions(load(composition_manifest("flow", composition, extra)))
    return errors.get("flow", [])


def test_valid_composition_has_no_check_errors() -> None:
    assert check("""
      steps:
        - {name: first, call: {capability: add, input: {a: input.a}}}
        - {call: {capability: add, input: {a: steps.first.sum, b: "`2`"}}}
        - {call: {capability: greet, input: {name: input.who}}}
        - mapReduce:
            over: input.xs
            map: {call: {capability: add, input: {a: item}}}
            reduce: {capability: total}
    """, "requires: {a: {type: integer}, who: {type: string}, xs: {type: array}}") == []


@pytest.mark.parametrize(("composition", "path", "fragment"), [
    ("{steps: [{call: {capability: nowhere}}]}",
     "steps[0].call.capability", "'nowhere', which is not declared"),
    ("{steps: [{call: {capability: add, input: {b: input.b}}}]}",
     "steps[0].call.input.a", "required field 'a' of 'add' is not mapped"),
    ("{steps: [{call: {capability: add, input: {a: input.a, c: input.b}}}]}",
     "steps[0].call.input.c", "'add' requires no field 'c'"),
    ("{steps: [{name: hi, call: {capability: greet, input: {name: input.who}}},"
     " {call: {capability: add, input: {a: steps.hi.text}}}]}",
     "steps[1].call.input.a", "is string but 'add' requires 'a' as integer"),
    ("{steps: [{call: {capability: add, input: {a: steps.later.sum}}},"
     " {name: later, call: {capability: add, input: {a: input.a}}}]}",
     "steps[0].call.input.a", "refers to step 'later', which does not run before"),
    ("{steps: [{name: s, call: {capability: add, input: {a: input.a}}},"
     " {call: {capability: add, input: {a: steps.s.total}}}]}",
     "steps[1].call.input.a", "no field 'total' there"),
    ("{steps: [{parallel: {branches: {x: {call: {capability: greet, input: {name: input.a}}}}}}]}",
     "steps[0].parallel.branches.x.call.input.name", "is integer but 'greet' requires"),
    ("{steps: [{mapReduce: {over: input.xs, map: {call: {capability: add, input: {a: item}}},"
     " reduce: {capability: greet}}}]}",
     "steps[0].mapReduce.reduce.capability", "must require an 'items' field"),
])
def test_check_names_step_and_field(composition: str, path: str, fragment: str) -> None:
    errors = check(composition, "requires: {a: {type: integer}, b: {type: integer}, "
                                "who: {type: string}, xs: {type: array}}")
    assert [e.path for e in errors] == [f"spec.implementation.composition.{path}"], errors
    assert fragment in errors[0].message


def test_remote_steps_are_not_checked_against_local_contracts() -> None:
    assert check("{steps: [{call: {capability: elsewhere, address: 'peer:50051',"
                 " input: {anything: input.x}}}]}") == []


def test_cycle_through_compositions_is_rejected() -> None:
    capabilities = load(
        composition_manifest("a", "{steps: [{call: {capability: echo}}, {call: {capability: b}}]}")
        + composition_manifest("b", "{steps: [{pipeline: [{call: {capability: a}}]}]}")
        + composition_manifest("c", "{steps: [{call: {capability: c}}]}")
        + composition_manifest("d", "{steps: [{call: {capability: a}}]}"))
    errors = check_compositions(capabilities)
    assert errors["a"] == [CheckError("spec.implementation.composition.steps[1].call.capability",
                                      "cycle: a -> b -> a")]
    assert errors["b"] == [CheckError(
        "spec.implementation.composition.steps[0].pipeline[0].call.capability",
        "cycle: b -> a -> b")]
    assert errors["c"][0].message == "cycle: c -> c"
    assert "d" not in errors  # d calls into the cycle but is not part of it


CHECK_LEAVES = """
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: nothing}
spec:
  intent: Takes and gives no fields
  requires: {}
  provides: {}
  implementation: {builtin: {name: echo}}
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: maybe}
spec:
  intent: Provides fields of every kind
  provides:
    opt: {type: [string, "null"], optional: true}
    plain: {type: [string, "null"]}
    dflt: {type: [integer, "null"], default: 1}
    ratio: {type: number}
    count: {type: integer}
    free: {}
  implementation: {builtin: {name: echo}}
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: scale}
spec:
  intent: Takes a number
  requires: {factor: {type: number}}
  implementation: {builtin: {name: echo}}
"""
NOT_BEFORE = "{!r} refers to step {!r}, which does not run before this point"


@pytest.mark.parametrize(("composition", "expected"), [
    # Every expression is checked where it is, and named by its own path.
    ("{steps: [{mapReduce: {over: steps.nope.xs, map: {call: {capability: echo}}}}]}",
     [("steps[0].mapReduce.over", NOT_BEFORE.format("steps.nope.xs", "nope"))]),
    ("{steps: [{conditional: {when: [{if: steps.nope.ok, then: {call: {capability: echo}}}]}}]}",
     [("steps[0].conditional.when[0].if", NOT_BEFORE.format("steps.nope.ok", "nope"))]),
    ("{steps: [{call: {capability: echo}, output: steps.nope.x}]}",
     [("steps[0].output", NOT_BEFORE.format("steps.nope.x", "nope"))]),
    # A step's `output` replaces its contract: what it provides is no longer known.
    ("{steps: [{name: s, call: {capability: add, input: {a: input.a}}, output: '{t: result.sum}'},"
     " {call: {capability: add, input: {a: steps.s.zzz}}}]}", []),
    # A nested pipeline's steps are its own; its own errors carry its path.
    ("{steps: [{pipeline: [{name: inner, call: {capability: nowhere}}]},"
     " {call: {capability: add, input: {a: steps.inner.sum}}}]}",
     [("steps[0].pipeline[0].call.capability", "step 'inner' calls capability 'nowhere', which "
       "is not declared (set address for a remote one)"),
      ("steps[1].call.input.a", NOT_BEFORE.format("steps.inner.sum", "inner"))]),
    # `last` is the previous step's contract; in a map it is the item, not known.
    ("{steps: [{call: {capability: greet, input: {name: input.who}}},"
     " {name: one, call: {capability: add, input: {a: last.text}}},"
     " {name: two, call: {capability: add, input: {a: last.nope}}}]}",
     [("steps[1].call.input.a", "step 'one': 'last.text' is string but 'add' requires 'a' as "
       "integer"),
      ("steps[2].call.input.a", "'last.nope': no field 'nope' there (it provides sum)")]),
    ("{steps: [{call: {capability: add, input: {a: input.a}}},"
     " {mapReduce: {over: input.xs, map: {call: {capability: add, input: {a: last.zzz}}}}}]}", []),
    # No contract: any field may be mapped, and every expression is still checked.
    ("{steps: [{call: {capability: echo, input: {x: input.a, y: steps.nope.q}}}]}",
     [("steps[0].call.input.y", NOT_BEFORE.format("steps.nope.q", "nope"))]),
    ("{steps: [{call: {capability: add, input: {c: input.a, a: input.who}}}]}",
     [("steps[0].call.input.c", "step 'add': 'add' requires no field 'c' (it requires a, b)"),
      ("steps[0].call.input.a", "step 'add': 'input.who' is string but 'add' requires 'a' as "
       "integer")]),
    ("{steps: [{name: n, call: {capability: nothing}},"
     " {call: {capability: nothing, input: {x: steps.n.x}}}]}",
     [("steps[1].call.input.x", "'steps.n.x': no field 'x' there (it provides no fields)"),
      ("steps[1].call.input.x", "step 'nothing': 'nothing' requires no field 'x' (it requires "
       "no fields)")]),
    # Types: null is dropped when the field may be absent; a number takes an integer;
    # untyped fields take and give anything.
    ("{steps: [{name: m, call: {capability: maybe}},"
     " {name: g1, call: {capability: greet, input: {name: steps.m.opt}}},"
     " {name: g2, call: {capability: greet, input: {name: steps.m.plain}}},"
     " {name: g3, call: {capability: greet, input: {name: steps.m.free}}},"
     " {name: a1, call: {capability: add, input: {a: steps.m.dflt}}},"
     " {name: a2, call: {capability: add, input: {a: steps.m.ratio}}},"
     " {name: s1, call: {capability: scale, input: {factor: steps.m.count}}},"
     " {name: s2, call: {capability: scale, input: {factor: input.who}}}]}",
     [("steps[2].call.input.name", "step 'g2': 'steps.m.plain' is null or string but 'greet' "
       "requires 'name' as string"),
      ("steps[5].call.input.a", "step 'a2': 'steps.m.ratio' is number but 'add' requires 'a' "
       "as integer"),
      ("steps[7].call.input.factor", "step 's2': 'input.who' is string but 'scale' requires "
       "'factor' as number")]),
    ("{steps: [{mapReduce: {over: input.xs, map: {call: {capability: echo}},"
     " reduce: {capability: nowhere}}}]}",
     [("steps[0].mapReduce.reduce.capability", "reducer capability 'nowhere' is not declared")]),
    ("{steps: [{mapReduce: {over: input.xs, map: {name: m, call: {capability: nowhere}}}}]}",
     [("steps[0].mapReduce.map.call.capability", "step 'm' calls capability 'nowhere', which "
       "is not declared (set address for a remote one)")]),
    # The composition's own input is a contract too; a nested pipeline sees `last`.
    ("{steps: [{call: {capability: echo, input: {x: input.nope}}}]}",
     [("steps[0].call.input.x", "'input.nope': no field 'nope' there (it provides a, who, xs)")]),
    ("{steps: [{call: {capability: add, input: {a: input.a}}},"
     " {pipeline: [{call: {capability: add, input: {a: last.nope}}}]}]}",
     [("steps[1].pipeline[0].call.input.a", "'last.nope': no field 'nope' there (it provides "
       "sum)")]),
    ("{steps: [{call: {capability: echo}}], triggers: [{schedule: '* * * * *'}]}", []),
])
def test_check_reports_exactly_these_errors(composition: str,
                                            expected: list[tuple[str, str]]) -> None:
    capabilities = load(CHECK_LEAVES + composition_manifest("flow", composition, (
        "requires: {a: {type: integer}, who: {type: string}, xs: {type: array}}")))
    errors = check_compositions(capabilities).get("flow", [])
    assert [(e.path.removeprefix("spec.implementation.composition."), e.message)
            for e in errors] == expected


def test_one_composition_is_checked_against_local_contracts_by_default() -> None:
    spec = parse_composition({"steps": [{"call": {"capability": "elsewhere"}}]})
    assert isinstance(spec, CompositionSpec)
    assert [e.path for e in check_composition(spec, {})] == [
        "spec.implementation.composition.steps[0].call.capability"]


def test_on_kubernetes_undeclared_targets_are_services_but_expressions_are_checked() -> None:
    composition = ("{steps: [{call: {capability: elsewhere, input: {x: steps.nope.q}}},"
                   " {mapReduce: {over: input.xs, map: {call: {capability: echo}},"
                   " reduce: {capability: elsewhere}}}]}")
    capabilities = load(composition_manifest("flow", composition))
    remote = check_compositions(capabilities, undeclared_remote=True)["flow"]
    assert [e.path.rsplit(".", 3)[-3:] for e in remote] == [["call", "input", "x"]]
    local = check_compositions(capabilities)["flow"]
    assert [e.path.removeprefix("spec.implementation.composition.") for e in local] == [
        "steps[0].call.capability", "steps[1].mapReduce.reduce.capability"]


def test_cycles_through_reducers_and_not_through_remote_ones() -> None:
    reduce_by = ("{{steps: [{{mapReduce: {{over: input.xs, map: {{call: {{capability: echo}}}},"
                 " reduce: {{capability: {target}}}}}}}]}}")
    capabilities = load(
        composition_manifest("a", reduce_by.format(target="b"))
        + composition_manifest("b", "{steps: [{call: {capability: a}}]}")
        + composition_manifest("c", reduce_by.format(target="'c', address: 'peer:1'")))
    errors = check_compositions(capabilities)
    assert errors["a"] == [CheckError(
        "spec.implementation.composition.steps[0].mapReduce.reduce.capability",
        "cycle: a -> b -> a")]
    assert "c" not in errors
    # A composition given by name alone (no capability declares it) is checked too.
    spec = composition_of(capabilities[-1])
    assert spec is not None
    assert check_compositions(capabilities[:-1], {"ghost": spec}) == {
        "a": errors["a"], "b": errors["b"]}


# ============================================================================ pipeline

async def test_pipeline_maps_inputs_and_output_and_traces_steps() -> None:
    engine = build(composition_manifest("flow", """
      steps:
        - {name: first, call: {capability: add, input: {a: input.x, b: "`1`"}}}
        - {name: second, call: {capability: add, input: {a: steps.first.sum, b: input.x}}}
      output: "{first: steps.first.sum, second: result.sum}"
    """))
    output, trace = await run(engine, {"x": 10})
    assert output == {"first": 11, "second": 21}
    assert trace["outcome"] == "OK" and trace["traceId"] == "trace-1"
    assert [(s["path"], s["name"], s["capability"], s["inputFields"], s["attempts"],
             s["outcome"]) for s in trace["steps"]] == [
        ("steps[0]", "first", "add", ["a", "b"], 1, "OK"),
        ("steps[1]", "second", "add", ["a", "b"], 1, "OK")]
    assert all(s["durationMs"] >= 0 for s in trace["steps"])


async def test_unmapped_step_gets_the_previous_output_and_null_fields_are_left_out() -> None:
    engine = build(composition_manifest("flow", """
      steps:
        - {call: {capability: echo}}
        - {call: {capability: add, input: {a: last.a, b: last.missing}}}
    """))
    output, _ = await run(engine, {"a": 5})
    assert output == {"sum": 5}  # b fell back to its default


async def test_failing_step_fails_the_pipeline_naming_the_step() -> None:
    engine = build(composition_manifest("flow", """
      steps:
        - {name: bad, call: {capability: add, input: {a: input.text}}}
        - {call: {capability: echo}}
    """))
    error, trace = await fails(engine, {"text": "one"})
    assert isinstance(error, InvalidInput)
    assert error.message.startswith("step 'bad': ")
    assert [v.field for v in error.violations] == ["steps.bad.input.a"]
    assert [(s["name"], s["outcome"]) for s in trace["steps"]] == [("bad", "INVALID_ARGUMENT")]
    assert trace["outcome"] == "INVALID_ARGUMENT"


# ============================================================================ parallel

PARALLEL = """
  steps:
    - parallel:
        branches:
          fast: {{call: {{capability: add, input: {{a: input.a}}}}}}
          slow: {{call: {{capability: probe}}}}
          other: {{call: {{capability: greet, input: {{name: input.who}}}}}}
        {options}
"""


async def test_parallel_all_collects_every_branch() -> None:
    engine = build(composition_manifest("flow", PARALLEL.format(options="join: all")),
                   {"probe": Probe(respond=lambda v: {"probed": v["a"]})})
    output, trace = await run(engine, {"a": 2, "who": "ann"})
    assert output == {"fast": {"sum": 2}, "slow": {"probed": 2}, "other": {"text": "hello ann"}}
    assert sorted(s["path"] for s in trace["steps"]) == [
        "steps[0]", "steps[0].parallel.branches.fast", "steps[0].parallel.branches.other",
        "steps[0].parallel.branches.slow"]


@pytest.mark.parametrize(("join", "expected"), [
    ("any", {"fast", "other"}), ("{first: 2}", {"fast", "other"})])
async def test_parallel_any_and_first_n_cancel_the_rest(join: str, expected: set[str]) -> None:
    probe = Probe(gate=never_set())
    engine = build(composition_manifest("flow", PARALLEL.format(options=f"join: {join}")),
                   {"probe": probe})
    output, trace = await run(engine, {"a": 2, "who": "ann"})
    if join == "any":
        assert len(output) == 1 and set(output) <= expected
    else:
        assert set(output) == expected
    assert probe.cancelled == 1  # the slow branch was stopped, not abandoned
    slow = next(s for s in trace["steps"] if s["path"].endswith("slow"))
    assert slow["outcome"] == "CANCELLED"


async def test_parallel_optional_branch_failure_is_left_out() -> None:
    engine = build(composition_manifest("flow", PARALLEL.format(options="optional: [slow]")),
                   {"probe": Probe(failures=[Unavailable("down")])})
    output, _ = await run(engine, {"a": 2, "who": "ann"})
    assert output == {"fast": {"sum": 2}, "other": {"text": "hello ann"}}


async def test_parallel_required_branch_failure_cancels_siblings() -> None:
    gate = never_set()
    probe = Probe(gate=gate)
    engine = build(composition_manifest("flow", PARALLEL.format(options="")), {"probe": probe})
    error, _ = await fails(engine, {"a": "not a number", "who": "ann"})
    assert code_of(error) == Code.INVALID_ARGUMENT and "step 'add'" in error.message
    assert probe.cancelled == 1


async def test_parallel_any_fails_when_no_branch_can_succeed() -> None:
    engine = build(composition_manifest("flow", """
      steps:
        - parallel:
            join: any
            branches: {x: {call: {capability: probe}}, y: {call: {capability: probe}}}
    """), {"probe": Probe(failures=[Unavailable("one"), Unavailable("two")])})
    error, _ = await fails(engine, {})
    assert isinstance(error, Unavailable)


async def test_parallel_branch_timeout() -> None:
    probe = Probe(gate=never_set())
    # The gated branch can never finish; the others must finish within the same limit, so it
    # is generous for a busy machine.
    engine = build(composition_manifest("flow", PARALLEL.format(
        options="timeoutSeconds: 2")), {"probe": probe})
    error, trace = await fails(engine, {"a": 2, "who": "ann"})
    assert isinstance(error, DeadlineExceeded)
    assert "branch 'slow'" in error.message
    assert probe.cancelled == 1
    assert trace["outcome"] == "DEADLINE_EXCEEDED"


async def test_parallel_branch_timeout_of_an_optional_branch_is_tolerated() -> None:
    options = "timeoutSeconds: 2\n        optional: [slow]"
    engine = build(composition_manifest("flow", PARALLEL.format(options=options)),
                   {"probe": Probe(gate=never_set())})
    output, _ = await run(engine, {"a": 2, "who": "ann"})
    assert set(output) == {"fast", "other"}


async def test_branch_deadline_reaches_the_child_context() -> None:
    probe = Probe()
    engine = build(composition_manifest("flow", """
      steps: [{parallel: {timeoutSeconds: 5, branches: {x: {call: {capability: probe}}}}}]
    """), {"probe": probe})
    await run(engine, {})
    remaining = probe.contexts[0].time_remaining()
    assert remaining is not None and 0 < remaining <= 5
    assert probe.contexts[0].trace_id == "trace-1" and probe.contexts[0].caller == "tests"


# ============================================================================ conditional

CONDITIONAL = composition_manifest("flow", """
  steps:
    - conditional:
        when:
          - {if: "input.n > `10`", then: {call: {capability: greet, input: {name: "'big'"}}}}
          - {if: "input.tags", then: {call: {capability: greet, input: {name: "input.tags[0]"}}}}
        else: {call: {capability: greet, input: {name: "'default'"}}}
""")


@pytest.mark.parametrize(("value", "text"), [
    ({"n": 11}, "hello big"), ({"n": 1, "tags": ["t"]}, "hello t"),
    ({"n": 1, "tags": []}, "hello default"), ({"n": 0}, "hello default")])
async def test_conditional_picks_first_true_branch_else_default(
        value: dict[str, Any], text: str) -> None:
    output, _ = await run(build(CONDITIONAL), value)
    assert output == {"text": text}


async def test_conditional_without_match_or_default_outputs_empty_object() -> None:
    engine = build(composition_manifest("flow", """
      steps: [{conditional: {when: [{if: input.go, then: {call: {capability: echo}}}]}}]
    """))
    assert (await run(engine, {"go": False}))[0] == {}
    assert (await run(engine, {"go": True}))[0] == {"go": True}


# ============================================================================ map-reduce

def map_reduce(reduce: str, concurrency: int = 3) -> str:
    return composition_manifest("flow", f"""
      steps:
        - mapReduce:
            over: input.numbers
            item: n
            concurrency: {concurrency}
            map: {{call: {{capability: add, input: {{a: n, b: input.offset}}}}}}
            reduce: {reduce}
    """)


@pytest.mark.parametrize(("reduce", "expected"), [
    ("collect", {"items": [{"sum": 11}, {"sum": 12}, {"sum": 13}]}),
    ("sum", {"sum": 36}),
    ("count", {"count": 3}),
    ("merge", {"sum": 13}),
    ("{capability: total}", {"total": 36}),
])
async def test_map_reduce_reducers(reduce: str, expected: dict[str, Any]) -> None:
    output, trace = await run(build(map_reduce(reduce)), {"numbers": [1, 2, 3], "offset": 10})
    assert output == expected
    paths = [s["path"] for s in trace["steps"]]
    assert {f"steps[0].mapReduce.map[{i}]" for i in range(3)} <= set(paths)


async def test_map_reduce_bounds_concurrency() -> None:
    probe = Probe(respond=lambda v: {"n": v["n"]})
    engine = build(composition_manifest("flow", """
      steps:
        - mapReduce:
            over: input.items
            concurrency: 3
            map: {call: {capability: probe, input: {n: item}}}
            reduce: collect
    """), {"probe": probe})
    output, _ = await run(engine, {"items": list(range(20))})
    assert output == {"items": [{"n": n} for n in range(20)]}  # in input order
    assert len(probe.calls) == 20
    assert probe.max_in_flight == 3


async def test_map_reduce_item_failure_cancels_the_other_items() -> None:
    gate = never_set()
    probe = Probe(gate=gate)
    engine = build(composition_manifest("flow", """
      steps:
        - mapReduce:
            over: input.items
            concurrency: 4
            map: {call: {capability: probe, input: {n: item}}}
    """), {"probe": probe})
    probe.failures = [Unavailable("item broke")]
    error, _ = await fails(engine, {"items": [1, 2, 3, 4, 5]})
    assert isinstance(error, Unavailable)
    assert probe.cancelled == 3 and probe.in_flight == 0


async def test_map_reduce_over_a_non_list_is_invalid() -> None:
    error, _ = await fails(build(map_reduce("collect")), {"numbers": 3, "offset": 0})
    assert isinstance(error, InvalidInput)
    assert error.violations[0].field == "steps.mapReduce.over"


async def test_map_reduce_over_an_empty_list() -> None:
    assert (await run(build(map_reduce("count")), {"numbers": [], "offset": 0}))[0] == {
        "count": 0}


# ============================================================================ retry

def retried(retry: str, capability: str = "probe") -> str:
    return composition_manifest("flow", f"""
      steps: [{{name: flaky, call: {{capability: {capability}}}, retry: {retry}}}]
    """)


async def test_retry_succeeds_after_transient_unavailable() -> None:
    probe = Probe(failures=[Unavailable("blip"), Unavailable("blip")])
    engine = build(retried("{maxAttempts: 3, backoffSeconds: 0.001}"), {"probe": probe})
    output, trace = await run(engine, {"x": 1})
    assert output == {"x": 1}
    assert len(probe.calls) == 3
    assert trace["steps"][0]["attempts"] == 3 and trace["steps"][0]["outcome"] == "OK"


async def test_retry_exhausts_and_reports_the_last_error() -> None:
    probe = Probe(failures=[Unavailable(f"down {i}") for i in range(5)])
    engine = build(retried("{maxAttempts: 3, backoffSeconds: 0.001}"), {"probe": probe})
    error, trace = await fails(engine, {})
    assert isinstance(error, Unavailable) and "down 2" in error.message
    assert len(probe.calls) == 3
    assert trace["steps"][0]["attempts"] == 3
    assert trace["steps"][0]["outcome"] == "UNAVAILABLE"


async def test_retry_skips_non_retryable_codes() -> None:
    probe = Probe(failures=[InvalidInput([])])
    engine = build(retried("{maxAttempts: 5, backoffSeconds: 0.001}"), {"probe": probe})
    await fails(engine, {})
    assert len(probe.calls) == 1


async def test_retry_never_sleeps_past_the_callers_deadline() -> None:
    probe = Probe(failures=[Unavailable("down")] * 5)
    engine = build(retried("{maxAttempts: 5, backoffSeconds: 30}"), {"probe": probe})
    error, _ = await fails(engine, {}, timeout=2)
    # The last real error, not a timeout after sleeping: a backoff slept into the deadline
    # would end in DEADLINE_EXCEEDED.
    assert isinstance(error, Unavailable)
    assert len(probe.calls) == 1


async def test_retry_on_the_attempts_own_deadline() -> None:
    # `quick` times out after 0.2 s (its timeoutSeconds) on the first attempt only.
    first = asyncio.Event()
    calls = 0

    async def slow_then_fast(value: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            await first.wait()
        return {"attempt": calls}

    engine = build(retried("{maxAttempts: 2, backoffSeconds: 0}", "quick"),
                   {"quick": slow_then_fast})
    output, trace = await run(engine, {}, timeout=10)
    assert output == {"attempt": 2}
    assert trace["steps"][0]["attempts"] == 2


# ============================================================================ cancellation

async def test_cancelling_the_call_cancels_the_running_step() -> None:
    probe = Probe(gate=never_set())
    engine = build(composition_manifest("flow", """
      steps:
        - {call: {capability: echo}}
        - parallel: {branches: {a: {pipeline: [{call: {capability: probe}}]}}}
    """), {"probe": probe})
    ctx = context()
    call = asyncio.create_task(engine.invoke("flow", {}, ctx))
    await eventually(lambda: probe.in_flight == 1, what="the step to start")
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert probe.cancelled == 1 and probe.in_flight == 0
    trace = trace_of(ctx)
    assert trace is not None and trace["outcome"] == "CANCELLED"
    assert {s["outcome"] for s in trace["steps"][1:]} == {"CANCELLED"}


async def test_callers_deadline_cancels_the_running_step() -> None:
    probe = Probe(gate=never_set())
    engine = build(composition_manifest("flow", "{steps: [{call: {capability: probe}}]}"),
                   {"probe": probe})
    # Long enough for the step to start on a busy machine; the gated step never finishes.
    error, _ = await fails(engine, {}, timeout=1)
    assert isinstance(error, DeadlineExceeded)
    assert probe.cancelled == 1


# ============================================================================ nesting, metrics

async def test_nested_composition_trace_and_error_path() -> None:
    engine = build(
        composition_manifest("inner", "{steps: [{name: deep, call: {capability: add}}]}")
        + composition_manifest("flow", "{steps: [{name: outer, call: {capability: inner}}]}"))
    output, trace = await run(engine, {"a": 4})
    assert output == {"sum": 4}
    assert trace["steps"][0]["trace"]["steps"][0]["name"] == "deep"
    error, _ = await fails(engine, {"a": "x"})
    assert error.message.startswith("step 'outer': step 'deep': ")


async def test_step_metrics() -> None:
    registry = CollectorRegistry()
    probe = Probe(failures=[Unavailable("blip")])
    engine = build(retried("{maxAttempts: 2, backoffSeconds: 0}"), {"probe": probe},
                   metrics=StepMetrics(registry))
    await run(engine, {})
    labels = {"composition": "flow", "step": "flaky"}
    assert registry.get_sample_value("packetflow_step_duration_seconds_count", labels) == 1
    assert registry.get_sample_value("packetflow_step_attempts_total", labels) == 2
    assert registry.get_sample_value("packetflow_step_failures_total",
                                     {**labels, "code": "OK"}) is None
    # A step that ends in an error is counted once, by its code (retries are attempts).
    probe.failures = [Unavailable("down"), Unavailable("down")]
    await fails(engine, {})
    probe.failures = [InvalidInput([])]
    await fails(engine, {})
    assert registry.get_sample_value("packetflow_step_failures_total",
                                     {**labels, "code": "UNAVAILABLE"}) == 1
    assert registry.get_sample_value("packetflow_step_failures_total",
                                     {**labels, "code": "INVALID_ARGUMENT"}) == 1
    assert registry.get_sample_value("packetflow_step_attempts_total", labels) == 5
    assert registry.get_sample_value("packetflow_step_duration_seconds_count", labels) == 3


async def test_handler_without_remote_caller_refuses_remote_steps() -> None:
    spec = parse_composition({"steps": [{"call": {"capability": "x", "address": "h:1"}}]})
    assert isinstance(spec, CompositionSpec)

    async def no_local(name: str, value: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        raise AssertionError("not called")

    handler: Callable[[dict[str, Any], CallContext], Awaitable[dict[str, Any]]] = (
        composition_handler(spec, no_local))
    with pytest.raises(PacketFlowError, match="no remote caller"):
        await handler({}, context())


# ============================================================================ triggers

def test_cron_parses_and_finds_next_fire_times() -> None:
    saturday_noon = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    assert Cron.parse("*/15 9-17 * * 1-5").next_after(saturday_noon) == datetime(
        2026, 11, 30, 9, 0, tzinfo=UTC)
    assert Cron.parse("*/2 * * * * *").next_after(saturday_noon) == datetime(
        2026, 11, 28, 12, 0, 2, tzinfo=UTC)
    assert Cron.parse("0 0 29 2 *").next_after(saturday_noon) == datetime(
        2028, 2, 29, tzinfo=UTC)


def test_bad_trigger_is_rejected_naming_the_field() -> None:
    errors = parse_composition({"steps": [{"call": {"capability": "x"}}],
                                "triggers": [{"schedule": "61 * * * *"}]})
    assert errors == [("spec.implementation.composition.triggers[0].schedule",
                       "cron minute field '61' is out of range 0-59")]
    assert check("""
      steps: [{call: {capability: echo}}]
      triggers: [{completed: {capability: nowhere}}]
    """) == [CheckError("spec.implementation.composition.triggers[0].completed.capability",
                        "trigger waits for capability 'nowhere', which is not declared")]


def triggered(on: str, handlers: dict[str, Handler]) -> tuple[Engine, TriggerRunner]:
    """An engine whose `flow` composition forwards the event to `probe`, and its runner."""
    engine = build(composition_manifest("flow", f"""
      steps: [{{call: {{capability: probe}}}}]
      triggers: {on}
    """), handlers)
    spec = composition_of(engine.served["flow"].capability)
    assert spec is not None
    return engine, TriggerRunner(engine.invoke, {"flow": list(spec.triggers)},
                                 redelivery_seconds=0.001)


async def test_duplicate_event_runs_once() -> None:
    probe = Probe()
    _, runner = triggered("[{completed: {capability: add}, idempotencyKey: input.a}]",
                          {"probe": probe})
    trigger = runner.subscriptions[0].trigger
    event = {"type": "completed", "id": "e1", "input": {"a": 1}}
    first, second = await asyncio.gather(runner.deliver("flow", event, trigger),
                                         runner.deliver("flow", dict(event), trigger))
    assert sorted([first, second]) == [False, True]
    assert not await runner.deliver("flow", {**event, "id": "e2"}, trigger)  # same key: a=1
    assert await runner.deliver("flow", {**event, "input": {"a": 2}}, trigger)
    assert [call["input"] for call in probe.calls] == [{"a": 1}, {"a": 2}]


async def test_failed_delivery_is_redelivered_at_least_once() -> None:
    probe = Probe(failures=[Unavailable("blip")])
    _, runner = triggered("[{completed: {capability: add}}]", {"probe": probe})
    assert await runner.deliver("flow", {"id": "e1"})
    assert len(probe.calls) == 2  # redelivered after the transient failure, then done
    assert not await runner.deliver("flow", {"id": "e1"})
    # A non-retryable failure releases the key: a later redelivery may run it.
    probe.failures = [InvalidInput([])]
    with pytest.raises(InvalidInput):
        await runner.deliver("flow", {"id": "e2"})
    assert await runner.deliver("flow", {"id": "e2"})


async def test_completion_trigger_runs_with_the_event_as_input() -> None:
    probe = Probe()
    engine, _ = triggered("[{completed: {capability: add, outcome: any}}]", {"probe": probe})
    output = await engine.invoke("add", {"a": 3}, context("add"))  # the engine fires the event
    await eventually(lambda: len(probe.calls) == 1 and not engine.triggers.tasks,
                     what="the triggered run")
    event = probe.calls[0]
    call_id = event["id"].removeprefix("completed:add:")
    engine.triggers.completed("add", {"a": 3}, Code.OK, output, "trace-1", call_id)  # again
    engine.triggers.completed("greet", {}, Code.OK, {}, "trace-10", "c10")  # not subscribed
    await eventually(lambda: not engine.triggers.tasks, what="the duplicate to be dropped")
    assert probe.calls == [{"type": "completed", "id": f"completed:add:{call_id}",
                            "capability": "add", "outcome": "success", "code": "OK",
                            "input": {"a": 3}, "output": {"sum": 3}, "traceId": "trace-1"}]
    await engine.aclose()


async def test_calls_sharing_a_trace_are_distinct_events() -> None:
    probe = Probe()
    engine, _ = triggered("[{completed: {capability: add}}]", {"probe": probe})
    for a in (1, 2, 3):  # one trace id (context() always says trace-1): three calls
        await engine.invoke("add", {"a": a}, context("add"))
    await eventually(lambda: len(probe.calls) == 3 and not engine.triggers.tasks,
                     what="three triggered runs")
    assert sorted(call["input"]["a"] for call in probe.calls) == [1, 2, 3]
    await engine.aclose()


async def test_failed_call_fires_failure_triggers_only() -> None:
    probe = Probe()
    engine, _ = triggered("[{completed: {capability: add, outcome: failure}}]",
                          {"probe": probe})
    await engine.invoke("add", {"a": 1}, context("add"))
    with pytest.raises(InvalidInput):
        await engine.invoke("add", {"a": "one"}, context("add"))
    await eventually(lambda: len(probe.calls) == 1 and not engine.triggers.tasks,
                     what="the failure-triggered run")
    assert probe.calls[0]["outcome"] == "failure"
    assert probe.calls[0]["code"] == "INVALID_ARGUMENT" and probe.calls[0]["output"] is None
    await engine.aclose()


async def test_sqlite_keys_survive_a_restart_and_stale_claims_expire(tmp_path: Path) -> None:
    clock = [1000.0]
    store = SqliteIdempotencyStore(tmp_path / "t.db", lease_seconds=10, clock=lambda: clock[0])
    assert await store.claim("done") and await store.claim("crashed")
    await store.complete("done")
    assert not await store.claim("crashed")  # another delivery holds a live lease
    await store.aclose()
    reopened = SqliteIdempotencyStore(tmp_path / "t.db", lease_seconds=10,
                                      clock=lambda: clock[0])
    assert not await reopened.claim("done")
    clock[0] += 11  # the process that claimed "crashed" died: its lease runs out
    assert await reopened.claim("crashed")
    await reopened.release("crashed")
    assert await reopened.claim("crashed") and not await reopened.claim("done")
    await reopened.aclose()


async def test_scheduled_trigger_fires() -> None:
    probe = Probe()
    _, runner = triggered("[{schedule: '* * * * * *'}]", {"probe": probe})
    schedules = asyncio.create_task(runner.run_schedules())
    try:
        await eventually(lambda: len(probe.calls) >= 2, timeout=10,
                         what="two scheduled runs")
    finally:
        schedules.cancel()
        await runner.close()
    first, second = probe.calls[:2]
    assert first["type"] == "schedule" and first["id"] != second["id"]
    assert first["scheduledAt"] < second["scheduledAt"]


async def test_replicas_sharing_a_postgres_store_fire_each_schedule_once(
        postgres_dsn: str) -> None:
    probes = [Probe(), Probe()]
    stores = [await PostgresIdempotencyStore.connect(postgres_dsn) for _ in probes]
    engines = []
    for probe, store in zip(probes, stores, strict=True):
        engine = build(composition_manifest("flow", """
          steps: [{call: {capability: probe}}]
          triggers: [{schedule: '* * * * * *'}]
        """), {"probe": probe})
        # The engine's own runner, now over the shared store: as two pods would run it.
        engine.triggers.store = store
        engine.start_triggers()
        engines.append(engine)
    try:
        await eventually(lambda: sum(len(p.calls) for p in probes) >= 4, timeout=15,
                         what="four scheduled runs across both replicas")
    finally:
        for engine in engines:
            await engine.aclose()
    fired = [call["scheduledAt"] for probe in probes for call in probe.calls]
    assert len(fired) == len(set(fired))  # no fire time ran on both replicas
