"""MCP overhead: ``tools/call`` of ``echo`` through PacketFlow vs a bare SDK ``MCPServer``.

Both servers speak streamable HTTP on 127.0.0.1 in stateless mode with SSE responses, the
same configuration, and get the same 1 KiB message; the bare one is the SDK's ``MCPServer``
with an ``echo`` tool returning a structured ``{message}``, PacketFlow serves the builtin
``echo`` capability with the same contract. Method (as in ``bench.runtime``):

- each server runs in its own subprocess; the client (official SDK ``Client``) is this one;
- warm-up first, then alternating runs (bare, runtime, ...) of sequential and concurrent
  calls; each ratio is the median of adjacent pairs' ratios, so drift of a shared machine
  cancels, reported with its spread; when one pair varies by more than 10% the runs are
  measured again twice as long, within ``BUDGET_SECONDS``; ``mcp_ratio`` is the concurrent
  one (throughput under load);
- latencies are per call as the client sees them.

``python -m bench.mcp --serve bare|runtime`` is the server subprocess: it prints its port and
serves until stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from bench.common import (
    Pairs,
    Run,
    calls_for,
    ratio_figures,
    rounded,
    run_summary,
    server_process,
    steady_pairs,
)

MESSAGE = "x" * 1010
CONCURRENCY = 16
PAIRS = 7
RUN_SECONDS = 1.0
MIN_CALLS, MAX_CALLS = 64, 5000
WARMUP_CALLS = 100
BUDGET_SECONDS = 90.0  # both modes: runs lengthen (variation > 10%) only within this

ECHO_MANIFEST = """\
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: echo}
spec:
  intent: "Return the message it is given"
  requires:
    message: {type: string}
  provides:
    message: {type: string}
  implementation:
    builtin: {name: echo}
  concurrency: 1024
"""


# --- the server subprocesses -----------------------------------------------------------

class Echoed(BaseModel):
    """What the bare server's ``echo`` returns (module level: the SDK resolves annotations)."""

    message: str


async def _serve_bare() -> None:
    import uvicorn
    from mcp.server.mcpserver import MCPServer

    server = MCPServer("bare-echo")

    @server.tool(description="Return the message it is given")
    def echo(message: str) -> Echoed:
        return Echoed(message=message)

    app = server.streamable_http_app(stateless_http=True, host="127.0.0.1")
    # uvicorn binds the port itself, as `uvicorn.run` would: the SDK's documented setup.
    config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on", ws="none",
                            log_level="warning", access_log=False)
    web = uvicorn.Server(config)
    task = asyncio.create_task(web.serve())
    while not web.started:
        if task.done():
            raise SystemExit("bare server did not start")
        await asyncio.sleep(0.01)
    print(web.servers[0].sockets[0].getsockname()[1], flush=True)
    await asyncio.to_thread(sys.stdin.read)
    web.should_exit = True
    await task


async def _serve_runtime() -> None:
    from packetflow.engine import Engine
    from packetflow.manifests import load_text
    from packetflow.mcp.http import McpHttpServer
    from packetflow.mcp.server import McpService

    loaded = load_text(ECHO_MANIFEST, "bench/mcp.py")
    engine = Engine(loaded.capabilities)
    server = await McpHttpServer.start(McpService.for_engine(engine), "127.0.0.1:0")
    print(server.port, flush=True)
    await asyncio.to_thread(sys.stdin.read)
    await server.stop()


def serve_main(argv: Sequence[str]) -> None:
    """Entry point of the server subprocess."""
    parser = argparse.ArgumentParser(prog="python -m bench.mcp")
    parser.add_argument("--serve", choices=("bare", "runtime"), required=True)
    args = parser.parse_args(argv)
    asyncio.run(_serve_bare() if args.serve == "bare" else _serve_runtime())


# --- the client ---------------------------------------------------------------------------

async def _call(client: Any) -> float:
    started = time.perf_counter()
    result = await client.call_tool("echo", {"message": MESSAGE})
    if result.is_error or result.structured_content != {"message": MESSAGE}:
        raise RuntimeError(f"echo did not echo: {result}")
    return time.perf_counter() - started


async def run_calls(client: Any, calls: int, concurrency: int) -> Run:
    """``calls`` calls from ``concurrency`` workers."""
    async def worker(count: int) -> list[float]:
        return [await _call(client) for _ in range(count)]

    per_worker = max(1, calls // concurrency)
    started = time.perf_counter()
    results = await asyncio.gather(*(worker(per_worker) for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies = [latency for result in results for latency in result]
    return Run(len(latencies) / elapsed, latencies)


def _calls_for(rate: float, multiple: int) -> int:
    return calls_for(rate, multiple, seconds=RUN_SECONDS, least=MIN_CALLS, most=MAX_CALLS)


async def measure() -> dict[str, Any]:
    """Run the comparison and return its figures."""
    from mcp.client import Client

    bench_started = time.perf_counter()
    async with (server_process("bench.mcp", "bare") as bare_port,
                server_process("bench.mcp", "runtime") as rt_port,
                Client(f"http://127.0.0.1:{bare_port}/mcp") as bare,
                Client(f"http://127.0.0.1:{rt_port}/mcp") as runtime):
        clients = {"bare": bare, "runtime": runtime}
        for client in clients.values():
            await client.list_tools()  # the client validates results against outputSchema
        modes = {"sequential": 1, "concurrent": CONCURRENCY}
        # Warm up each server in each mode; the slower side's rates size the runs, and both
        # servers then get the same call counts.
        counts = {}
        for mode, concurrency in modes.items():
            rates = [(await run_calls(client, WARMUP_CALLS, concurrency)).calls_per_s
                     for client in clients.values()]
            counts[mode] = _calls_for(min(rates), concurrency)
        runs: dict[tuple[str, str], list[Run]] = {}
        found: dict[str, Pairs] = {}
        for mode, concurrency in modes.items():
            async def pair(scale: float, mode: str = mode, concurrency: int = concurrency
                           ) -> tuple[float, float]:
                rates = []
                for kind, client in clients.items():  # bare, then runtime
                    run = await run_calls(client, int(counts[mode] * scale), concurrency)
                    runs.setdefault((kind, mode), []).append(run)
                    rates.append(run.calls_per_s)
                return rates[0], rates[1]

            found[mode] = await steady_pairs(pair, pairs=PAIRS, budget_s=BUDGET_SECONDS / 2)

    figures: dict[str, Any] = {
        **ratio_figures("mcp_ratio", found["concurrent"].ratios),
        **ratio_figures("mcp_sequential_ratio", found["sequential"].ratios),
    }
    for (kind, mode), measured in sorted(runs.items()):
        figures.update(run_summary(f"{kind}_{mode}", measured))
    figures.update({
        "message_bytes": len(MESSAGE), "concurrency": CONCURRENCY,
        "calls": {mode: int(counts[mode] * found[mode].scale) for mode in modes},
        "seconds": rounded(time.perf_counter() - bench_started, 1),
    })
    return figures


def run() -> dict[str, Any]:
    """The bench's figures: ``mcp_ratio`` (runtime / bare throughput), latencies, context."""
    return asyncio.run(measure())


if __name__ == "__main__":
    serve_main(sys.argv[1:])
