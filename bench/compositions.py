"""Compositions vs the client doing the same calls by hand, against one real runtime.

- ``pipeline_ratio``: a 5-step pipeline of ``echo`` invoked once, against 5 sequential
  ``Invoke`` calls of ``echo`` from the client; both pass the 1 KiB payload along. Ratio of
  throughputs (pipelines per second / hand-made chains per second).
- ``map_reduce_ratio``: a map-reduce over 100 items with concurrency 16, against the client
  making the same 100 ``echo`` calls at concurrency 16 and collecting the results.

The runtime is the real ``packetflow runtime`` in a subprocess (its own core), the client
this process. Runs alternate (hand, composition, hand, ...) and each ratio is the median of
adjacent pairs, as in ``bench.runtime``. A ratio >= 1.0 means composing in the runtime is not
slower than the client orchestrating the same work.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import orjson

from bench.common import percentile, ratio_figures, rounded, steady_pairs
from packetflow.v1 import runtime_pb2, runtime_pb2_grpc

MESSAGE = "x" * 1010  # {"message": ...} is 1 KiB of JSON, as in bench.runtime
ITEMS = 100
CONCURRENCY = 16
STEPS = 5
PAIRS = 9
RUN_SECONDS = 0.5
BUDGET_SECONDS = 30.0  # per comparison: runs lengthen (variation > 10%) only within this
START_TIMEOUT = 30.0

MANIFESTS = f"""\
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {{name: echo}}
spec:
  intent: Return the message it is given
  requires: {{message: {{type: string}}}}
  provides: {{message: {{type: string}}}}
  implementation: {{builtin: {{name: echo}}}}
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {{name: pipeline}}
spec:
  intent: Echo the message through {STEPS} steps
  requires: {{message: {{type: string}}}}
  provides: {{message: {{type: string}}}}
  implementation:
    composition:
      steps:
{"".join(f"        - {{name: s{i}, call: {{capability: echo}}}}{chr(10)}" for i in range(STEPS))}
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {{name: fanout}}
spec:
  intent: Echo every message of a list, {CONCURRENCY} at a time, and collect the replies
  requires: {{messages: {{type: array, items: {{type: string}}}}}}
  provides: {{items: {{type: array}}}}
  implementation:
    composition:
      steps:
        - mapReduce:
            over: input.messages
            concurrency: {CONCURRENCY}
            map: {{call: {{capability: echo, input: {{message: item}}}}}}
            reduce: collect
"""


@contextlib.asynccontextmanager
async def runtime_process() -> AsyncIterator[int]:
    """``packetflow runtime`` serving MANIFESTS on a free port; yields the port."""
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle.yaml"
        bundle.write_text(MANIFESTS)
        command = Path(sys.executable).parent / "packetflow"
        proc = await asyncio.create_subprocess_exec(
            str(command), "runtime", "--bundle", str(bundle), "--address", "127.0.0.1:0",
            "--metrics-address", "", "--state-dir", str(Path(tmp) / "state"),
            stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        assert proc.stderr is not None
        try:
            yield await asyncio.wait_for(_announced_port(proc.stderr), START_TIMEOUT)
        finally:
            proc.terminate()
            await proc.wait()


async def _announced_port(stderr: asyncio.StreamReader) -> int:
    seen: list[str] = []
    while line := (await stderr.readline()).decode():
        seen.append(line)
        found = re.search(r"serving .* on port (\d+)", line)
        if found:
            # Keep draining stderr so a chatty runtime never blocks on a full pipe.
            task = asyncio.get_running_loop().create_task(_drain(stderr))
            _background.add(task)
            return int(found.group(1))
    raise RuntimeError("runtime did not start:\n" + "".join(seen))


_background: set[asyncio.Task[None]] = set()


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


def _request(name: str, value: dict[str, Any]) -> runtime_pb2.InvokeRequest:
    return runtime_pb2.InvokeRequest(capability=name, input_json=orjson.dumps(value))


class Workloads:
    """The two ways of doing each job: by hand from the client, or as one composition."""

    def __init__(self, stub: runtime_pb2_grpc.CapabilityRuntimeStub) -> None:
        self.stub = stub
        self.messages = [f"{i}:{MESSAGE}"[:1010] for i in range(ITEMS)]

    async def chain_by_hand(self) -> Any:
        value: Any = {"message": MESSAGE}
        for _ in range(STEPS):
            response = await self.stub.Invoke(_request("echo", value))
            value = orjson.loads(response.output_json)
        return value

    async def chain_composed(self) -> Any:
        response = await self.stub.Invoke(_request("pipeline", {"message": MESSAGE}))
        return orjson.loads(response.output_json)

    async def fanout_by_hand(self) -> Any:
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(message: str) -> Any:
            async with gate:
                response = await self.stub.Invoke(_request("echo", {"message": message}))
                return orjson.loads(response.output_json)

        return {"items": await asyncio.gather(*(one(m) for m in self.messages))}

    async def fanout_composed(self) -> Any:
        response = await self.stub.Invoke(_request("fanout", {"messages": self.messages}))
        return orjson.loads(response.output_json)


Job = Callable[[], Awaitable[Any]]


async def timed(job: Job, count: int) -> tuple[float, list[float]]:
    """Run ``job`` ``count`` times back to back; (jobs per second, latencies)."""
    latencies = []
    started = time.perf_counter()
    for _ in range(count):
        t0 = time.perf_counter()
        await job()
        latencies.append(time.perf_counter() - t0)
    return count / (time.perf_counter() - started), latencies


async def compare(name: str, by_hand: Job, composed: Job) -> dict[str, float | int]:
    """Alternate the two, return the median ratio of pairs (with its spread) and both sides'
    latencies."""
    if await by_hand() != await composed():
        raise RuntimeError(f"{name}: the composition and the client disagree on the result")
    rate, _ = await timed(composed, 20)  # warm-up; sizes the runs
    count = max(10, int(rate * RUN_SECONDS))
    hand_latencies: list[float] = []
    composed_latencies: list[float] = []

    async def pair(scale: float) -> tuple[float, float]:
        hand_rate, hand = await timed(by_hand, int(count * scale))
        composed_rate, comp = await timed(composed, int(count * scale))
        hand_latencies.extend(hand)
        composed_latencies.extend(comp)
        return hand_rate, composed_rate

    found = await steady_pairs(pair, pairs=PAIRS, budget_s=BUDGET_SECONDS)
    return {
        **ratio_figures(f"{name}_ratio", found.ratios),
        f"{name}_by_hand_p50_ms": rounded(percentile(hand_latencies, 0.5) * 1e3),
        f"{name}_composed_p50_ms": rounded(percentile(composed_latencies, 0.5) * 1e3),
        f"{name}_by_hand_p99_ms": rounded(percentile(hand_latencies, 0.99) * 1e3),
        f"{name}_composed_p99_ms": rounded(percentile(composed_latencies, 0.99) * 1e3),
    }


async def measure() -> dict[str, Any]:
    """Both comparisons against one runtime process."""
    started = time.perf_counter()
    async with (runtime_process() as port,
                grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel):
        work = Workloads(runtime_pb2_grpc.CapabilityRuntimeStub(channel))
        figures: dict[str, Any] = {"bench": "compositions"}
        figures |= await compare("pipeline", work.chain_by_hand, work.chain_composed)
        figures |= await compare("map_reduce", work.fanout_by_hand, work.fanout_composed)
    figures |= {"steps": STEPS, "items": ITEMS, "concurrency": CONCURRENCY,
                "seconds": rounded(time.perf_counter() - started, 1)}
    return figures


def run() -> dict[str, Any]:
    """Entry point used by ``python -m bench compositions``."""
    return asyncio.run(measure())
