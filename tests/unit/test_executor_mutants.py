"""Composition executor details the broader executor tests leave open."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any

import pytest

from packetflow.composition.executor import composition_handler, trace_of
from packetflow.composition.model import CompositionSpec, parse_composition
from packetflow.context import CallContext
from packetflow.errors import Unavailable


def spec(composition: dict[str, Any]) -> CompositionSpec:
    parsed = parse_composition(composition)
    assert isinstance(parsed, CompositionSpec), parsed
    return parsed


async def test_a_failed_item_fails_the_map_only_once_its_siblings_have_stopped() -> None:
    """Nothing of a map outlives its step: a sibling still running is cancelled and waited
    for, its own cleanup included, before the step's error reaches the caller."""
    cleaned: list[str] = []
    blocked = asyncio.Event()

    async def invoke(name: str, value: Any, ctx: CallContext) -> dict[str, Any]:
        if value["item"] == "bad":
            await blocked.wait()  # fail only once the slow item is running
            raise Unavailable("item down")
        blocked.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            for _ in range(5):  # cleanup that takes a few turns of the loop
                await asyncio.sleep(0)
            cleaned.append(value["item"])
            raise
        return {}

    handler = composition_handler(spec({"steps": [{"name": "m", "mapReduce": {
        "over": "input.xs", "concurrency": 2,
        "map": {"call": {"capability": "work", "input": {"item": "item"}}}}}]}), invoke)
    ctx = CallContext(capability="flow", trace_id="t-1", caller="me", deadline=None)
    try:
        await handler({"xs": ["slow", "bad"]}, ctx)
    except Unavailable as exc:
        assert exc.message == "step 'work': item down"
    else:
        raise AssertionError("the map did not fail")
    assert cleaned == ["slow"]


async def test_each_retry_is_logged_with_its_step_attempt_code_and_delay(
        caplog: pytest.LogCaptureFixture) -> None:
    calls = 0

    async def flaky(name: str, value: Any, ctx: CallContext) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise Unavailable("not yet")
        return {}

    async def no_wait(delay: float) -> None:
        return None

    handler = composition_handler(spec({"steps": [{"call": {"capability": "c"}, "retry": {
        "maxAttempts": 3, "backoffSeconds": 0.25, "jitter": 0}}]}), flaky, sleep=no_wait)
    with caplog.at_level(logging.DEBUG, logger="packetflow.composition"):
        await handler({}, CallContext(capability="flow", trace_id="t", caller="me",
                                      deadline=None))
    assert [r.getMessage() for r in caplog.records if r.name == "packetflow.composition"] == [
        "step steps[0] attempt 1 failed with UNAVAILABLE; retrying in 0.250s",
        "step steps[0] attempt 2 failed with UNAVAILABLE; retrying in 0.500s"]


async def test_trace_times_are_milliseconds_of_the_clock(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each read of the clock moves it one second on: each step lasts 1000 ms, and the second
    starts 2000 ms after the first (the trace's own start is read from the real clock)."""
    ticks = itertools.count(int(time.perf_counter()) + 100)
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(ticks)))

    async def invoke(name: str, value: Any, ctx: CallContext) -> dict[str, Any]:
        return {}

    handler = composition_handler(spec({"steps": [{"call": {"capability": "a"}},
                                                  {"call": {"capability": "b"}}]}), invoke)
    ctx = CallContext(capability="flow", trace_id="t", caller="me", deadline=None)
    await handler({}, ctx)
    monkeypatch.undo()
    trace = trace_of(ctx)
    assert trace is not None
    first, second = trace["steps"]
    assert (first["durationMs"], second["durationMs"]) == (1000.0, 1000.0)
    assert second["startedMs"] - first["startedMs"] == pytest.approx(2000.0, abs=0.01)
    # The call ends at the fifth read: 4000 ms after the first step started.
    assert trace["durationMs"] - first["startedMs"] == pytest.approx(4000.0, abs=0.01)
