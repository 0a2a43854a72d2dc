"""Composition executor details the broader executor tests leave open."""

from __future__ import annotations

import asyncio
from typing import Any

from packetflow.composition.executor import composition_handler
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
