"""Run a composition: turn a ``CompositionSpec`` into a handler the engine can serve.

The spec is compiled once into a tree of nodes (expressions compiled, reducers chosen); each
call then walks the tree with a fresh scope and trace. Steps call capabilities through the
``invoke`` (local, usually ``Engine.invoke``) and ``remote`` callables, each with a child
``CallContext`` that shares the caller's trace id, caller identity and deadline.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import jmespath
import orjson
from jmespath.parser import ParsedResult

from packetflow.composition.metrics import StepMetrics
from packetflow.composition.model import (
    Call,
    CompositionSpec,
    FirstN,
    MapReduce,
    Parallel,
    ReduceCall,
    Retry,
    Step,
)
from packetflow.context import CallContext, Handler
from packetflow.errors import (
    Code,
    DeadlineExceeded,
    FieldViolation,
    HandlerFailed,
    InvalidInput,
    PacketFlowError,
    code_of,
)

log = logging.getLogger("packetflow.composition")

Invoke = Callable[[str, dict[str, Any], CallContext], Awaitable[dict[str, Any]]]
"""Call a local capability: ``(name, input, ctx) -> output`` (``Engine.invoke``)."""
Remote = Callable[[str, str, dict[str, Any], CallContext], Awaitable[dict[str, Any]]]
"""Call a remote capability: ``(address, name, input, ctx) -> output``."""

TRACE_METADATA_KEY = "packetflow-composition-trace"
"""``CallContext.metadata`` key under which a composition leaves its trace (JSON)."""

RETRYABLE_CODES = frozenset({Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED, Code.RESOURCE_EXHAUSTED})
MAX_TRACE_STEPS = 1000  # a 100k-item map must not build a 100k-entry trace


# ----------------------------------------------------------------------------- trace

@dataclass
class StepRecord:
    """One step's execution: where it is, what it got, how long it took, how it ended."""

    path: str
    name: str
    kind: str
    started_ms: float
    duration_ms: float = 0.0
    attempts: int = 0
    outcome: str = Code.OK.value
    capability: str | None = None
    address: str | None = None
    input_fields: list[str] = field(default_factory=list)
    error: str | None = None
    trace: dict[str, Any] | None = None  # a nested composition's own trace

    def as_dict(self) -> dict[str, Any]:
        """Plain data, without the fields that are unset."""
        out = {"path": self.path, "name": self.name, "kind": self.kind,
               "startedMs": round(self.started_ms, 3), "durationMs": round(self.duration_ms, 3),
               "attempts": self.attempts, "outcome": self.outcome}
        if self.capability is not None:
            out["capability"] = self.capability
            out["inputFields"] = self.input_fields
        for key, value in (("address", self.address), ("error", self.error),
                           ("trace", self.trace)):
            if value is not None:
                out[key] = value
        return out


@dataclass
class ExecutionTrace:
    """The steps of one composition call, in the order they finished."""

    composition: str
    trace_id: str
    max_steps: int = MAX_TRACE_STEPS
    started: float = field(default_factory=time.perf_counter)
    steps: list[StepRecord] = field(default_factory=list)
    dropped: int = 0
    outcome: str = Code.OK.value
    duration_ms: float = 0.0

    def add(self, record: StepRecord) -> None:
        """Keep the record unless the trace is full (then count it as dropped)."""
        if len(self.steps) < self.max_steps:
            self.steps.append(record)
        else:
            self.dropped += 1

    def as_dict(self) -> dict[str, Any]:
        """Plain data, as sent in response metadata."""
        out: dict[str, Any] = {"composition": self.composition, "traceId": self.trace_id,
                               "outcome": self.outcome,
                               "durationMs": round(self.duration_ms, 3),
                               "steps": [r.as_dict() for r in self.steps]}
        if self.dropped:
            out["droppedSteps"] = self.dropped
        return out


def trace_of(ctx: CallContext) -> dict[str, Any] | None:
    """The trace a composition handler left on ``ctx`` (after the call), if any."""
    raw = ctx.metadata.get(TRACE_METADATA_KEY)
    return None if raw is None else orjson.loads(raw)


# ----------------------------------------------------------------------------- run state

@dataclass
class Frame:
    """What every node of one call shares: caller context, deadline, trace, callables."""

    ctx: CallContext
    deadline: float | None
    trace: ExecutionTrace
    invoke: Invoke
    remote: Remote | None
    metrics: StepMetrics | None
    random: Callable[[], float]
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    def within(self, deadline: float | None) -> Frame:
        """The same frame with a deadline no later than ``deadline`` (a branch timeout)."""
        if deadline is None or (self.deadline is not None and self.deadline <= deadline):
            return self
        return Frame(self.ctx, deadline, self.trace, self.invoke, self.remote, self.metrics,
                     self.random, self.sleep)

    def child_context(self, capability: str) -> CallContext:
        """A fresh context for one child call (the engine narrows its deadline in place)."""
        return CallContext(capability=capability, trace_id=self.ctx.trace_id,
                           caller=self.ctx.caller, deadline=self.deadline,
                           progress_sink=self.ctx.progress_sink)


@dataclass
class Scope:
    """The data expressions see: input, earlier steps' outputs, the last output, item names."""

    input: Any
    steps: dict[str, Any]
    last: Any
    names: dict[str, Any] = field(default_factory=dict)

    def data(self, **extra: Any) -> dict[str, Any]:
        """The object expressions are evaluated over."""
        return {**self.names, "input": self.input, "steps": self.steps, "last": self.last,
                **extra}

    def child(self, **names: Any) -> Scope:
        """A scope for a nested pipeline, branch or item: sees ours, adds nothing back."""
        last = names.pop("last", self.last)
        return Scope(self.input, dict(self.steps), last, {**self.names, **names})


# ----------------------------------------------------------------------------- nodes

class Node:
    """A compiled step: retry, trace, metrics and ``output`` around the kind's own run."""

    kind = "step"

    def __init__(self, step: Step, path: str) -> None:
        self.name = step.label
        self.path = path
        self.retry: Retry | None = step.retry
        self.output: ParsedResult | None = (
            None if step.output is None else jmespath.compile(step.output))

    async def run_once(self, scope: Scope, frame: Frame, record: StepRecord) -> Any:
        """One attempt of this step."""
        raise NotImplementedError

    async def execute(self, scope: Scope, frame: Frame, path: str | None = None) -> Any:
        """Run with retries; record the step in the trace; apply ``output``."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        record = StepRecord(path or self.path, self.name, self.kind,
                            (started - frame.trace.started) * 1000)
        try:
            result = await self._attempts(scope, frame, record, loop)
            if self.output is not None:
                result = self.output.search(scope.data(result=result))
            return result
        except asyncio.CancelledError:
            record.outcome = Code.CANCELLED.value
            raise
        except PacketFlowError as exc:
            record.outcome = code_of(exc).value
            record.error = exc.message
            raise
        except Exception as exc:
            record.outcome = Code.INTERNAL.value
            record.error = type(exc).__name__
            raise
        finally:
            elapsed = time.perf_counter() - started
            record.duration_ms = elapsed * 1000
            frame.trace.add(record)
            if frame.metrics is not None:
                frame.metrics.observe(frame.trace.composition, self.name, elapsed,
                                      record.attempts, record.outcome)

    async def _attempts(self, scope: Scope, frame: Frame, record: StepRecord,
                        loop: asyncio.AbstractEventLoop) -> Any:
        policy = self.retry
        attempts = 1 if policy is None else policy.max_attempts
        for attempt in range(1, attempts + 1):
            record.attempts = attempt
            try:
                return await self.run_once(scope, frame, record)
            except PacketFlowError as exc:
                if policy is None or attempt == attempts or code_of(exc) not in RETRYABLE_CODES:
                    raise
                delay = min(policy.max_backoff_seconds,
                            policy.backoff_seconds * 2 ** (attempt - 1))
                delay *= 1 - policy.jitter * frame.random()
                # The attempt's own deadline passing is retryable; the caller's is not, and
                # neither is a backoff that would end after it.
                if frame.deadline is not None and loop.time() + delay >= frame.deadline:
                    raise
                log.debug("step %s attempt %d failed with %s; retrying in %.3fs",
                          self.path, attempt, code_of(exc), delay)
                await frame.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")


class CallNode(Node):
    """Call one capability, local or remote."""

    kind = "call"

    def __init__(self, step: Step, path: str) -> None:
        super().__init__(step, path)
        assert step.call is not None
        self.call: Call = step.call
        self.mapping = None if step.call.input is None else {
            name: jmespath.compile(expression) for name, expression in step.call.input.items()}

    def build_input(self, scope: Scope) -> Any:
        """The call's input: the mapping evaluated over the scope, or ``last``."""
        if self.mapping is None:
            return scope.last
        data = scope.data()
        value = {}
        for name, expression in self.mapping.items():
            found = expression.search(data)
            if found is not None:  # null leaves the field out, so its default applies
                value[name] = found
        return value

    async def run_once(self, scope: Scope, frame: Frame, record: StepRecord) -> Any:
        value = self.build_input(scope)
        record.capability = self.call.capability
        record.address = self.call.address
        record.input_fields = sorted(value) if isinstance(value, dict) else []
        return await call_capability(self.call.capability, self.call.address, value, frame,
                                     self.name, record)


async def call_capability(capability: str, address: str | None, value: Any, frame: Frame,
                          step: str, record: StepRecord | None = None) -> dict[str, Any]:
    """Call ``capability`` with a child context; errors keep their code and name the step."""
    ctx = frame.child_context(capability)
    try:
        if address is None:
            return await frame.invoke(capability, value, ctx)
        if frame.remote is None:
            # The step is named by _in_step below, like every error of the call.
            raise HandlerFailed(f"calls {capability!r} at {address}, but this runtime has no "
                                "remote caller")
        return await frame.remote(address, capability, value, ctx)
    except PacketFlowError as exc:
        raise _in_step(exc, step) from None
    finally:
        if record is not None and TRACE_METADATA_KEY in ctx.metadata:
            record.trace = trace_of(ctx)


def _in_step(exc: PacketFlowError, step: str) -> PacketFlowError:
    """Prefix the message (and field paths) with the step, keeping the error's class/code.

    A nested composition's errors pass here once per level, so the message reads as a path.
    """
    exc.message = f"step {step!r}: {exc.message}"
    exc.args = (exc.message,)
    if isinstance(exc, InvalidInput):
        exc.violations = [FieldViolation(f"steps.{step}.{v.field}", v.description)
                          for v in exc.violations]
    return exc


class PipelineNode(Node):
    """Steps in order; each output is recorded under the step's name."""

    kind = "pipeline"

    def __init__(self, step: Step | None, steps: list[Step], path: str, steps_path: str) -> None:
        if step is not None:
            super().__init__(step, path)
        else:  # the composition's top-level pipeline, run by the handler itself
            self.name, self.path, self.retry, self.output = "steps", path, None, None
        self.nodes = [compile_step(s, f"{steps_path}[{i}]") for i, s in enumerate(steps)]

    async def run_once(self, scope: Scope, frame: Frame, record: StepRecord) -> Any:
        return await self.run_in(scope.child(), frame)

    async def run_in(self, scope: Scope, frame: Frame) -> Any:
        """Run the steps in ``scope`` (which collects their outputs); return the last output."""
        for node in self.nodes:
            scope.last = await node.execute(scope, frame)
            scope.steps[node.name] = scope.last
        return scope.last


class ParallelNode(Node):
    """Branches at once; join all, any or first N; optional branches may fail."""

    kind = "parallel"

    def __init__(self, step: Step, path: str) -> None:
        super().__init__(step, path)
        assert step.parallel is not None
        spec: Parallel = step.parallel
        self.branches = {name: compile_step(s, f"{path}.parallel.branches.{name}")
                         for name, s in spec.branches.items()}
        self.optional = frozenset(spec.optional)
        self.timeout = spec.timeout_seconds
        join = spec.join
        self.join_all = join == "all"
        self.needed = len(self.branches) if join == "all" else (
            join.first if isinstance(join, FirstN) else 1)

    async def branch(self, name: str, node: Node, scope: Scope, frame: Frame) -> Any:
        """One branch, within its time limit."""
        if self.timeout is None:
            return await node.execute(scope, frame)
        limit = asyncio.get_running_loop().time() + self.timeout
        timeout = asyncio.timeout_at(limit if frame.deadline is None
                                     else min(limit, frame.deadline))
        try:
            async with timeout:
                return await node.execute(scope, frame.within(limit))
        except TimeoutError:
            if timeout.expired():
                raise DeadlineExceeded(f"branch {name!r} of step {self.name!r} did not finish "
                                       f"within {self.timeout}s") from None
            raise

    async def run_once(self, scope: Scope, frame: Frame, record: StepRecord) -> Any:
        tasks = {asyncio.create_task(self.branch(name, node, scope.child(), frame)): name
                 for name, node in self.branches.items()}
        pending = set(tasks)
        results: dict[str, Any] = {}
        failures: list[BaseException] = []
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    name = tasks[task]
                    error = task.exception()
                    if error is None:
                        if self.join_all or len(results) < self.needed:
                            results[name] = task.result()
                    elif self.join_all and name not in self.optional:
                        raise error  # the finally cancels the siblings
                    else:
                        failures.append(error)
                if self.join_all:
                    continue  # every branch runs to its end (or its failure)
                if len(results) >= self.needed:
                    break
                if len(results) + len(pending) < self.needed:
                    raise failures[0]  # not enough branches left to satisfy the join
        finally:
            for task in pending:
                task.cancel()
            # Wait for the cancelled branches, so nothing of this step outlives it.
            await asyncio.gather(*pending, return_exceptions=True)
        return {name: results[name] for name in self.branches if name in results}


class ConditionalNode(Node):
    """The first branch whose condition is truthy, else the default, else ``{}``."""

    kind = "conditional"

    def __init__(self, step: Step, path: str) -> None:
        super().__init__(step, path)
        assert step.conditional is not None
        cond = step.conditional
        self.cases = [(jmespath.compile(w.if_),
                       compile_step(w.then, f"{path}.conditional.when[{i}].then"))
                      for i, w in enumerate(cond.when)]
        self.default = (None if cond.else_ is None
                        else compile_step(cond.else_, f"{path}.conditional.else"))

    async def run_once(self, scope: Scope, frame: Frame, record: StepRecord) -> Any:
        data = scope.data()
        for condition, node in self.cases:
            if truthy(condition.search(data)):
                return await node.execute(scope.child(), frame)
        if self.default is not None:
            return await self.default.execute(scope.child(), frame)
        return {}


def truthy(value: Any) -> bool:
    """JMESPath truthiness: false, null and empty strings, lists and objects are false."""
    if value is None or value is False:
        return False
    return not (isinstance(value, str | list | dict) and not value)


class MapReduceNode(Node):
    """``map`` over a list with bounded concurrency, then a reducer."""

    kind = "mapReduce"

    def __init__(self, step: Step, path: str) -> None:
        super().__init__(step, path)
        assert step.map_reduce is not None
        spec: MapReduce = step.map_reduce
        self.over = jmespath.compile(spec.over)
        self.item = spec.item
        self.map = compile_step(spec.map, f"{path}.mapReduce.map")
        self.concurrency = spec.concurrency
        self.reduce = spec.reduce

    async def run_once(self, scope: Scope, frame: Frame, record: StepRecord) -> Any:
        items = self.over.search(scope.data())
        if not isinstance(items, list):
            raise InvalidInput([FieldViolation(
                f"steps.{self.name}.over",
                f"must yield a list, got {type(items).__name__ if items is not None else 'null'}",
            )])
        outputs: list[Any] = [None] * len(items)
        indices = iter(range(len(items)))

        async def worker() -> None:
            # All workers draw from one iterator: each index is taken once, in order.
            for index in indices:
                item = items[index]
                outputs[index] = await self.map.execute(
                    scope.child(last=item, **{self.item: item}), frame,
                    f"{self.map.path}[{index}]")

        await run_all([worker() for _ in range(min(self.concurrency, len(items)))])
        return await self.reduced(outputs, frame)

    async def reduced(self, outputs: list[Any], frame: Frame) -> dict[str, Any]:
        """Apply the reducer to the map outputs (in item order)."""
        if isinstance(self.reduce, ReduceCall):
            return await call_capability(self.reduce.capability, self.reduce.address,
                                         {"items": outputs}, frame, f"{self.name}.reduce")
        if self.reduce == "collect":
            return {"items": outputs}
        if self.reduce == "count":
            return {"count": len(outputs)}
        if self.reduce == "merge":
            merged: dict[str, Any] = {}
            for output in outputs:
                if isinstance(output, dict):
                    merged.update(output)
            return merged
        totals: dict[str, Any] = {}
        for output in outputs:
            for key, value in (output.items() if isinstance(output, dict) else ()):
                if isinstance(value, int | float) and not isinstance(value, bool):
                    totals[key] = totals.get(key, 0) + value
        return totals


async def run_all(coroutines: list[Awaitable[None]]) -> None:
    """Run coroutines as tasks; on the first failure cancel the rest and raise it."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    if not tasks:
        return
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def compile_step(step: Step, path: str) -> Node:
    """The node that runs ``step`` (``path`` is its manifest path, for traces)."""
    if step.call is not None:
        return CallNode(step, path)
    if step.pipeline is not None:
        return PipelineNode(step, step.pipeline, path, f"{path}.pipeline")
    if step.parallel is not None:
        return ParallelNode(step, path)
    if step.conditional is not None:
        return ConditionalNode(step, path)
    return MapReduceNode(step, path)


# ----------------------------------------------------------------------------- handler

def composition_handler(
    spec: CompositionSpec,
    invoke: Invoke,
    remote: Remote | None = None,
    *,
    name: str = "composition",
    metrics: StepMetrics | None = None,
    rng: Callable[[], float] = random.random,
    max_trace_steps: int = MAX_TRACE_STEPS,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> Handler:
    """A handler running ``spec``; ``name`` labels its trace and metrics.

    ``rng`` draws the retry jitter and ``sleep`` waits out a backoff (tests inject both);
    ``max_trace_steps`` bounds the trace (the rest is counted
    as ``droppedSteps``), e.g. to fit response metadata.

    After each call (success or failure) the handler leaves its trace as JSON in
    ``ctx.metadata[TRACE_METADATA_KEY]``; ``trace_of(ctx)`` reads it back.
    """
    root = PipelineNode(None, spec.steps, "steps", "steps")
    output = None if spec.output is None else jmespath.compile(spec.output)

    async def run_composition(value: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        trace = ExecutionTrace(name, ctx.trace_id, max_trace_steps)
        frame = Frame(ctx, ctx.deadline, trace, invoke, remote, metrics, rng, sleep)
        scope = Scope(value, {}, value)
        outcome = Code.INTERNAL
        try:
            result = await root.run_in(scope, frame)
            if output is not None:
                result = output.search(scope.data(result=result))
            outcome = Code.OK
            return result  # type: ignore[no-any-return] # the engine checks provides
        except PacketFlowError as exc:
            outcome = code_of(exc)
            raise
        except asyncio.CancelledError:
            outcome = Code.CANCELLED
            raise
        finally:
            trace.outcome = outcome.value
            trace.duration_ms = (time.perf_counter() - trace.started) * 1000
            ctx.metadata[TRACE_METADATA_KEY] = orjson.dumps(trace.as_dict()).decode()

    return run_composition
