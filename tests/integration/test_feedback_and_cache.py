"""User feedback over real gRPC (stored durably, exported as a metric) and the runtime's
repeated-input signal and result cache (spec.cache)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import orjson
import pytest
from prometheus_client import generate_latest

from packetflow.caching import RecentInputs, ResultCache
from packetflow.client import CallError, RuntimeClient
from packetflow.engine import Engine
from packetflow.feedback import (
    FeedbackService,
    PostgresFeedbackStore,
    SqliteFeedbackStore,
    open_store,
)
from packetflow.manifests import load_text
from packetflow.server import RuntimeServer

pytest_plugins = ["tests.support.postgres"]

MANIFESTS = """
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: pure}
spec:
  intent: No effects, cached
  implementation: {builtin: {name: transform, config: {expression: "{n: n}"}}}
  cache: {ttl: 60s, maxEntries: 2}
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: writes}
spec:
  intent: Has effects
  implementation: {builtin: {name: echo}}
  effects: [state-write]
"""


def metric(engine: Engine, name: str, capability: str) -> float:
    for line in generate_latest(engine.metrics.registry).decode().splitlines():
        if line.startswith(f'{name}{{capability="{capability}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[RuntimeServer, FeedbackService]]:
    engine = Engine(load_text(MANIFESTS, "m.yaml").capabilities)
    feedback = FeedbackService(SqliteFeedbackStore(tmp_path / "feedback.db"),
                               engine.metrics.registry, engine.traces)
    server = await RuntimeServer.start(engine, "127.0.0.1:0", feedback=feedback)
    try:
        yield server, feedback
    finally:
        await server.stop(grace=0)
        await engine.aclose()
        await feedback.aclose()


async def test_feedback_is_recorded_against_the_call_that_served_the_trace(
        served: tuple[RuntimeServer, FeedbackService], tmp_path: Path) -> None:
    server, _ = served
    async with RuntimeClient(f"127.0.0.1:{server.port}") as client:
        reply = await client.invoke_raw("pure", orjson.dumps({"n": 1}))
        assert await client.feedback(reply.trace_id, 0.25) == "pure"
        assert await client.feedback("someone-elses-trace", 1.0, capability="writes",
                                     comment="great") == "writes"
        assert await client.feedback("never-seen", 0.5) == ""
        with pytest.raises(CallError) as bad:
            await client.feedback("t", 1.5)
        assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in bad.value.violations] == ["score"]
        with pytest.raises(CallError) as empty:
            await client.feedback("", 0.5, comment="x" * 1001)
        assert {v.field for v in empty.value.violations} == {"trace_id", "comment"}
    exposition = generate_latest(server.engine.metrics.registry).decode()
    assert 'packetflow_feedback_score_count{capability="pure"} 1.0' in exposition
    assert 'packetflow_feedback_score_sum{capability="pure"} 0.25' in exposition
    # Committed before the reply: another store opened on the same file reads it.
    reopened = await open_store(tmp_path, None)
    try:
        assert await reopened.summary("pure") == (1, 0.25)
        assert await reopened.summary("writes") == (1, 1.0)
    finally:
        await reopened.aclose()


async def test_a_runtime_without_feedback_says_so() -> None:
    engine = Engine(load_text(MANIFESTS, "m.yaml").capabilities)
    server = await RuntimeServer.start(engine, "127.0.0.1:0")
    try:
        async with RuntimeClient(f"127.0.0.1:{server.port}") as client:
            with pytest.raises(CallError) as refused:
                await client.feedback("t", 0.5)
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        await server.stop(grace=0)
        await engine.aclose()


async def test_feedback_in_a_shared_postgresql(postgres_dsn: str) -> None:
    first = await PostgresFeedbackStore.connect(postgres_dsn)
    second = await PostgresFeedbackStore.connect(postgres_dsn)  # another replica
    try:
        engine = Engine()
        service = FeedbackService(first, engine.metrics.registry)
        await service.record("t1", 0.5, "pure")
        await FeedbackService(second, Engine().metrics.registry).record("t2", 1.0, "pure")
        assert await first.summary("pure") == (2, 0.75)
        assert await second.summary("pure", since=1e12) == (0, 0.0)
    finally:
        await first.aclose()
        await second.aclose()


async def test_repeated_inputs_are_counted_and_cached_results_reused(
        served: tuple[RuntimeServer, FeedbackService]) -> None:
    server, _ = served
    engine = server.engine
    async with RuntimeClient(f"127.0.0.1:{server.port}") as client:
        for n in (1, 2, 1, 1, 3):
            assert await client.invoke("pure", {"n": n}) == {"n": n}
        for _ in range(3):
            await client.invoke("writes", {"m": 1})
    assert metric(engine, "packetflow_capability_repeated_inputs_total", "pure") == 2.0
    # Capabilities with effects are never cached, so their repeats are not counted.
    assert metric(engine, "packetflow_capability_repeated_inputs_total", "writes") == 0.0
    # {"n": 1} came back from the cache twice; every call still counts as a call.
    assert metric(engine, "packetflow_capability_cache_hits_total", "pure") == 2.0
    exposition = generate_latest(engine.metrics.registry).decode()
    assert 'packetflow_capability_calls_total{capability="pure",code="OK"} 5.0' in exposition


def test_cache_evicts_least_recent_and_expires() -> None:
    now = [0.0]
    cache = ResultCache(10.0, 2, clock=lambda: now[0])
    cache.put(b"a", b"1")
    cache.put(b"b", b"2")
    assert cache.get(b"a") == b"1"  # a is now the most recent
    cache.put(b"c", b"3")
    assert cache.get(b"b") is None and cache.get(b"c") == b"3"
    now[0] = 11.0
    assert cache.get(b"a") is None
    recent = RecentInputs(capacity=2)
    assert [recent.seen(k) for k in (1, 2, 1, 3, 2)] == [False, False, True, False, False]
