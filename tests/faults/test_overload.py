"""Overload: ten times a capability's declared ``concurrency`` offered to a runtime process.
The excess is refused with RESOURCE_EXHAUSTED at once (never queued behind the calls at work),
every accepted call answers within its deadline, resident memory does not grow from one
overload burst to the next, and once the load drops every call is served again."""

from __future__ import annotations

import asyncio
import collections
import time
from pathlib import Path

from packetflow.client import CallError, RuntimeClient
from tests.support.processes import RuntimeProcess

CONCURRENCY = 4
OFFERED = 10 * CONCURRENCY  # callers at once
WORK_SECONDS = 1.0  # each accepted call holds its slot this long
DEADLINE = 10.0  # the caller's, per call: generous for a loaded machine
ACCEPTED_PER_BURST = 3 * CONCURRENCY

BUNDLE = f"""
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {{name: work}}
spec:
  intent: Hold a call slot for a while
  requires: {{seconds: {{type: number}}}}
  concurrency: {CONCURRENCY}
  implementation: {{python: {{module: tests.support.fault_handlers, function: busy}}}}
"""


def resident_bytes(pid: int) -> int:
    """The process's resident set size."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Burst:
    """``OFFERED`` callers in a closed loop until ``ACCEPTED_PER_BURST`` calls were served."""

    def __init__(self) -> None:
        self.codes: collections.Counter[str] = collections.Counter()
        self.refusals: list[float] = []  # how long each refused call took
        self.accepted = 0

    async def caller(self, client: RuntimeClient) -> None:
        while self.accepted < ACCEPTED_PER_BURST:
            started = time.monotonic()
            try:
                await client.invoke("work", {"seconds": WORK_SECONDS}, timeout=DEADLINE)
            except CallError as exc:
                self.codes[exc.code.name] += 1
                if exc.code.name == "RESOURCE_EXHAUSTED":
                    self.refusals.append(time.monotonic() - started)
                await asyncio.sleep(0.02)  # a client's back-off, not a wait for a state
                continue
            self.codes["OK"] += 1
            self.accepted += 1

    async def run(self, client: RuntimeClient) -> Burst:
        await asyncio.gather(*(self.caller(client) for _ in range(OFFERED)))
        return self


async def test_ten_times_the_concurrency_is_refused_fast_and_the_rest_served(
        tmp_path: Path, processes: list[RuntimeProcess]) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "work.yaml").write_text(BUNDLE)
    runtime = RuntimeProcess(bundle, tmp_path / "state", tmp_path / "runtime.log")
    processes.append(runtime)
    pid = runtime.process.pid
    async with RuntimeClient(runtime.address) as client:
        await client.invoke("work", {"seconds": 0}, timeout=DEADLINE)
        bursts = []
        rss = []
        for _ in range(2):
            bursts.append(await Burst().run(client))
            rss.append(resident_bytes(pid))
        for burst in bursts:
            # Refused or served, nothing else: no deadline missed, no INTERNAL.
            assert set(burst.codes) == {"OK", "RESOURCE_EXHAUSTED"}, burst.codes
            assert burst.codes["RESOURCE_EXHAUSTED"] > burst.codes["OK"]
            # A refusal is not queued behind the calls at work (each holds its slot 1 s): all
            # but a few of them (a loaded machine may pause any call) come back before that.
            queued = [took for took in burst.refusals if took >= WORK_SECONDS]
            assert len(queued) <= len(burst.refusals) // 20, queued
        # Memory does not grow with the refused load (a second burst as big as the first).
        assert rss[1] <= rss[0] * 1.1 + 8 * 2**20, rss
        # The load drops to what was declared: every call is served again.
        results = await asyncio.gather(*(client.invoke("work", {"seconds": 0.1},
                                                       timeout=DEADLINE)
                                         for _ in range(CONCURRENCY)), return_exceptions=True)
        assert results == [{"slept": 0.1}] * CONCURRENCY, results
    assert runtime.process.poll() is None, runtime.log.read_text()
