"""The README's retry and redelivery schedules, with the wait injected instead of waited out.

Composition steps: ``backoffSeconds`` doubled per attempt, capped at ``maxBackoffSeconds``, less
a random share of up to ``jitter``. Triggers: a run failing with a retryable code is delivered
again after 0.5, 1, 2 and 4 s, at most 5 deliveries, then the key is released and the event
dropped with a warning.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

import pytest

from packetflow.composition.executor import composition_handler
from packetflow.composition.model import CompositionSpec, parse_composition
from packetflow.composition.triggers import MemoryIdempotencyStore, TriggerRunner
from packetflow.context import CallContext
from packetflow.errors import InvalidInput, PacketFlowError, Unavailable


class Sleeps:
    """An injected ``sleep``: records each delay and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


class Flaky:
    """A capability that fails its first ``failures`` calls with ``error``."""

    def __init__(self, failures: int, error: Callable[[], PacketFlowError] = lambda: Unavailable(
            "down")) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0

    async def __call__(self, name: str, value: dict[str, Any],
                       ctx: CallContext) -> dict[str, Any]:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error()
        return {"attempt": self.calls}


def spec(retry: dict[str, Any]) -> CompositionSpec:
    parsed = parse_composition({"steps": [{"name": "flaky", "call": {"capability": "flaky"},
                                           "retry": retry}]})
    assert isinstance(parsed, CompositionSpec), parsed
    return parsed


async def run_retried(retry: dict[str, Any], flaky: Flaky, rng: Callable[[], float] = random.random,
                      timeout: float | None = None) -> tuple[Any, list[float]]:
    """Run a one-step composition; return its output (or the error) and the delays slept."""
    sleeps = Sleeps()
    handler = composition_handler(spec(retry), flaky, rng=rng, sleep=sleeps)
    deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
    ctx = CallContext(capability="flow", trace_id="t", caller="tests", deadline=deadline)
    try:
        return await handler({}, ctx), sleeps.delays
    except PacketFlowError as exc:
        return exc, sleeps.delays


async def test_backoff_doubles_up_to_the_cap() -> None:
    flaky = Flaky(failures=5)
    output, delays = await run_retried({"maxAttempts": 6, "backoffSeconds": 1,
                                        "maxBackoffSeconds": 5, "jitter": 0}, flaky)
    assert output == {"attempt": 6}
    assert delays == [1, 2, 4, 5, 5]


async def test_defaults_are_three_attempts_from_a_tenth_of_a_second() -> None:
    flaky = Flaky(failures=10)
    error, delays = await run_retried({}, flaky, rng=lambda: 0.0)
    assert isinstance(error, Unavailable) and flaky.calls == 3
    assert delays == [0.1, 0.2]
    # The default jitter takes at most a fifth of each delay away.
    _, delays = await run_retried({}, Flaky(failures=10), rng=lambda: 1.0)
    assert delays == pytest.approx([0.08, 0.16])
    capped = await run_retried({"maxAttempts": 12, "backoffSeconds": 1}, Flaky(failures=11),
                               rng=lambda: 0.0)
    assert capped[1][-3:] == [10.0, 10.0, 10.0]  # maxBackoffSeconds defaults to 10


@pytest.mark.parametrize("jitter", [0.0, 0.2, 0.5, 1.0])
async def test_jitter_takes_at_most_its_share_of_each_delay(jitter: float) -> None:
    retry = {"maxAttempts": 5, "backoffSeconds": 2, "maxBackoffSeconds": 8, "jitter": jitter}
    full = [2.0, 4.0, 8.0, 8.0]
    _, lowest = await run_retried(retry, Flaky(failures=4), rng=lambda: 1.0)
    assert lowest == pytest.approx([d * (1 - jitter) for d in full])
    _, highest = await run_retried(retry, Flaky(failures=4), rng=lambda: 0.0)
    assert highest == full
    for _ in range(20):  # the real random source stays within the same bounds
        _, delays = await run_retried(retry, Flaky(failures=4))
        assert all(d * (1 - jitter) <= got <= d for got, d in zip(delays, full, strict=True))


async def test_non_retryable_codes_and_the_deadline_are_not_waited_on() -> None:
    flaky = Flaky(failures=3, error=lambda: InvalidInput([]))
    error, delays = await run_retried({"maxAttempts": 5}, flaky)
    assert isinstance(error, InvalidInput) and flaky.calls == 1 and delays == []
    # A backoff that would end after the caller's deadline is not made: the last error stands.
    flaky = Flaky(failures=3)
    error, delays = await run_retried({"maxAttempts": 5, "backoffSeconds": 120,
                                       "maxBackoffSeconds": 120}, flaky,
                                      timeout=60)
    assert isinstance(error, Unavailable) and flaky.calls == 1 and delays == []


# ----------------------------------------------------------------------------- triggers

def runner(flaky: Flaky, sleeps: Sleeps, store: MemoryIdempotencyStore) -> TriggerRunner:
    """The runner with its defaults, only the wait injected."""
    return TriggerRunner(flaky, {}, store, sleep=sleeps)


async def test_redelivery_waits_half_a_second_doubling_then_drops_after_five(
        caplog: pytest.LogCaptureFixture) -> None:
    flaky, sleeps, store = Flaky(failures=100), Sleeps(), MemoryIdempotencyStore()
    with caplog.at_level(logging.WARNING, "packetflow.composition.triggers"), \
            pytest.raises(Unavailable):
        await runner(flaky, sleeps, store).deliver("flow", {"id": "e1"})
    assert flaky.calls == 5
    assert sleeps.delays == [0.5, 1, 2, 4]
    assert "event e1 for flow failed" in caplog.text  # dropped with a warning
    # The key was released: a later delivery of the same event runs again.
    assert "e1" not in store.running and "e1" not in store.done
    flaky.failures = 0
    assert await runner(flaky, Sleeps(), store).deliver("flow", {"id": "e1"})


async def test_a_redelivery_that_succeeds_completes_the_key() -> None:
    flaky, sleeps, store = Flaky(failures=2), Sleeps(), MemoryIdempotencyStore()
    trigger_runner = runner(flaky, sleeps, store)
    assert await trigger_runner.deliver("flow", {"id": "e1"})
    assert flaky.calls == 3 and sleeps.delays == [0.5, 1]
    assert not await trigger_runner.deliver("flow", {"id": "e1"})  # done: a duplicate drops
    assert flaky.calls == 3


async def test_other_codes_are_not_redelivered() -> None:
    flaky = Flaky(failures=100, error=lambda: InvalidInput([]))
    sleeps, store = Sleeps(), MemoryIdempotencyStore()
    with pytest.raises(InvalidInput):
        await runner(flaky, sleeps, store).deliver("flow", {"id": "e1"})
    assert flaky.calls == 1 and sleeps.delays == []
    assert "e1" not in store.running
