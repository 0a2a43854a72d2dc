"""Children before status (pacing.py), on its own: no cluster, one event loop."""

from __future__ import annotations

import asyncio

from packetflow.operator.pacing import ChildrenFirst


async def test_settled_returns_at_once_when_no_owner_writes_children() -> None:
    gate = ChildrenFirst(bound=60)
    await asyncio.wait_for(gate.settled(), 5)  # would wait out the bound otherwise
    with gate.writing_children():
        pass
    assert gate.writing == 0
    await asyncio.wait_for(gate.settled(), 5)


async def test_settled_waits_until_the_last_owner_is_done() -> None:
    gate = ChildrenFirst(bound=60)
    first, second = gate.writing_children(), gate.writing_children()
    first.__enter__()
    second.__enter__()
    waiter = asyncio.create_task(gate.settled())
    await asyncio.sleep(0)  # let it start waiting
    first.__exit__(None, None, None)
    await asyncio.sleep(0)
    assert not waiter.done() and gate.writing == 1  # one owner still writes children
    second.__exit__(None, None, None)
    await asyncio.wait_for(waiter, 5)


async def test_settled_gives_up_after_its_bound_while_children_are_still_written() -> None:
    gate = ChildrenFirst(bound=0.05)
    with gate.writing_children():
        await asyncio.wait_for(gate.settled(), 5)  # never released: the bound ends the wait
        assert gate.writing == 1


async def test_a_failed_apply_still_counts_out() -> None:
    gate = ChildrenFirst(bound=60)
    try:
        with gate.writing_children():
            raise RuntimeError("the API server refused a child")
    except RuntimeError:
        pass
    assert gate.writing == 0
    await asyncio.wait_for(gate.settled(), 5)
