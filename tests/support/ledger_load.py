"""Numbered messages to ``Ledger`` actors (tests.support.actor_handlers), retried with their
message ids until acknowledged: the load of the fault tests and the soak, and its check that
nothing acknowledged was lost and nothing applied twice."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from packetflow.client import CallError, RuntimeClient


@dataclass
class LedgerLoad:
    """Each actor gets 0, 1, 2, ... in order; a failed send is retried with the same message
    id (what a careful client does) until it is acknowledged or the load stops."""

    actor_type: str
    actor_ids: list[str]
    timeout: float = 5.0
    note: bool = True  # each message also appends to the actor's memory
    acked: dict[str, list[int]] = field(default_factory=dict)
    codes: collections.Counter[str] = field(default_factory=collections.Counter)
    failures: list[tuple[float, str, float]] = field(default_factory=list)  # (at, code, took)
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (at, seconds) of OKs
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.acked = {actor_id: [] for actor_id in self.actor_ids}

    def least_acked(self) -> int:
        """Acknowledged messages of the actor with the fewest."""
        return min(len(numbers) for numbers in self.acked.values())

    def total_acked(self) -> int:
        """Acknowledged messages of all actors."""
        return sum(len(numbers) for numbers in self.acked.values())

    async def run(self, client: Callable[[], RuntimeClient], pause: float = 0.05) -> None:
        """Send until :attr:`stopping` is set; ``client`` gives the client to use now (it may
        change when a runtime is restarted elsewhere)."""
        await asyncio.gather(*(self._stream(client, actor_id, pause)
                               for actor_id in self.actor_ids))

    async def _stream(self, client: Callable[[], RuntimeClient], actor_id: str,
                      pause: float) -> None:
        n = 0
        while not self.stopping.is_set():
            message = {"n": n, **({"note": f"message {n}"} if self.note else {})}
            started = time.monotonic()
            try:
                await client().send(self.actor_type, actor_id, message,
                                    message_id=f"{actor_id}:{n}", timeout=self.timeout)
            except CallError as exc:
                self.codes[exc.code.name] += 1
                self.failures.append((started, exc.code.name, time.monotonic() - started))
                await asyncio.sleep(pause)  # a client's retry pause, not a wait for a state
                continue
            self.codes[grpc.StatusCode.OK.name] += 1
            self.latencies.append((started, time.monotonic() - started))
            self.acked[actor_id].append(n)
            n += 1

    async def lost_and_twice(self, client: RuntimeClient) -> tuple[int, int]:
        """(acknowledged messages missing from the state, messages applied more than once),
        read from each actor's committed state."""
        lost = twice = 0
        for actor_id, numbers in self.acked.items():
            applied = (await client.get_actor(self.actor_type, actor_id))["state"]["applied"]
            counts = collections.Counter(applied)
            lost += sum(1 for n in numbers if n not in counts)
            twice += sum(count - 1 for count in counts.values() if count > 1)
        return lost, twice
