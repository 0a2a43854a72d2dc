"""The gateway: its cost as a hop, and what its balancing does to the tail.

- ``gateway_ratio``: throughput of ``Invoke`` of ``echo`` (1 KiB, 64 concurrent) through
  the gateway to 2 runtimes / throughput calling one runtime directly. The same runtimes
  (the builtin echo, as in ``bench.runtime``) serve both; the gateway runs its defaults
  (peak-EWMA, hedging of the pure echo, budgets). Target >= 0.7: on these 2 cores the
  gateway's CPU competes with the client's and the runtimes'.
- ``tail_ratio``: p99 latency with one of three runtimes slowed (50 ms added to 10% of its
  calls) through the gateway / p99 with plain round-robin over the same three, done by the
  same gateway (same process, same hop; its endpoint choice swapped for a round-robin one,
  no hedging, no ejection): the baseline does the same work but for the policy. Target
  <= 0.3. ``tail_ratio_vs_client`` divides by the client's own round-robin instead (no hop:
  stricter, and on a busy machine dominated by how often the gateway process waits for a
  core). The load is open-loop at a fixed rate well below saturation (``TAIL_RATE``), each
  latency measured from the call's scheduled start: a tail measured at saturation is
  queueing, the same for any routing, and a closed loop would hide stalls (a stalled worker
  stops sending).

``python -m bench gateway --mtls`` measures zero trust instead: ``gateway_mtls_ratio`` =
throughput of the same calls (1 KiB echo, 64 concurrent, a gateway in front of 2 runtimes)
with mutual TLS on both sides of the gateway (the caller's certificate, the gateway's towards
runtimes that authorize the forwarded caller) / the same setup in plaintext.

Method, as every bench here: each server runs in its own subprocess; the client (this
process) warms up, then runs alternate (baseline, gateway, baseline, ...); each ratio is the
median of adjacent pairs' ratios and the spread (min, max) is printed; p50/p99 are the
medians of each run's own.

``python -m bench.gateway --serve runtime|gateway ...`` is a server subprocess: it prints its
port and serves until its stdin closes; ``--profile FILE`` writes cProfile stats of the
gateway (how its per-call costs were found).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from bench.common import (
    Run,
    calls_for,
    percentile,
    ratio_figures,
    rounded,
    run_server,
    run_summary,
    serve_until_stdin_closes,
    server_process,
    steady_pairs,
)
from bench.runtime import PAYLOAD, Target, bench_certificates, check_echo, run_concurrent
from packetflow.v1 import runtime_pb2, runtime_pb2_grpc

CONCURRENCY = 64
PAIRS = 15
TAIL_PAIRS = 7
TAIL_BUDGET_SECONDS = 150.0  # runs lengthen (a pair's ratio varies > 10%) only within this
RUN_SECONDS = 0.6
MIN_CALLS, MAX_CALLS = 640, 20_000
TAIL_RATE = 400.0  # calls per second
TAIL_CALLS = 1600  # per run (4 s): the p99 is the 16th slowest
WARMUP_ROUNDS = 10
BUDGET_SECONDS = 60.0  # gateway_ratio: runs lengthen only within this
STALL_SECONDS = 0.050
STALL_SHARE = 0.10
STALL_ENV = "PACKETFLOW_BENCH_STALL_SHARE"

STALL_MANIFEST = """\
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: echo}
spec:
  intent: "Return the message it is given, sometimes late"
  requires:
    message: {type: string}
  provides:
    message: {type: string}
  implementation:
    python: {module: bench.gateway, function: stalling_echo}
  concurrency: 1024
"""


async def stalling_echo(message: str) -> dict[str, Any]:
    """Echo, 50 ms late on the share of calls ``$PACKETFLOW_BENCH_STALL_SHARE`` says."""
    if random.random() < float(os.environ.get(STALL_ENV, "0")):
        await asyncio.sleep(STALL_SECONDS)
    return {"message": message}


# --- the server subprocesses -----------------------------------------------------------

async def _start_stalling_runtime(share: float) -> tuple[int, Any]:
    from packetflow.engine import Engine
    from packetflow.manifests import load_text
    from packetflow.server import RuntimeServer

    os.environ[STALL_ENV] = str(share)
    loaded = load_text(STALL_MANIFEST, "bench/gateway.py")
    engine = Engine(loaded.capabilities)
    if loaded.errors or engine.load_errors:
        raise SystemExit("; ".join(map(str, [*loaded.errors, *engine.load_errors])))
    server = await RuntimeServer.start(engine, "127.0.0.1:0")
    return server.port, server.server.stop


# The baseline's policy: plain round robin, nothing else (no hedge, no ejection).
PLAIN_TRAFFIC = "{hedging: {enabled: false}, outlierDetection: {consecutiveFailures: 1000000}}"


async def _start_gateway(backends: Sequence[str], round_robin: bool,
                         tls_dir: Path | None = None) -> tuple[int, Any]:
    from packetflow.gateway.routes import parse_routes
    from packetflow.gateway.routing import Pool
    from packetflow.gateway.server import GatewayServer
    from packetflow.identity.workload import WorkloadIdentity

    traffic = f", traffic: {PLAIN_TRAFFIC}" if round_robin else ""
    routes = parse_routes(f"capabilities: {{echo: {{backends: [{', '.join(backends)}]"
                          f"{traffic}}}}}", "bench/gateway.py")
    if round_robin:
        turns = itertools.count()

        def in_turn(pool: Pool, rng: Any, now: float, exclude: Any = ()) -> Any:
            return pool.available[next(turns) % len(pool.available)] if pool.available \
                else None
        Pool.pick = in_turn  # type: ignore[method-assign,assignment]
    identity = WorkloadIdentity(tls_dir / "gateway.crt", tls_dir / "gateway.key",
                                tls_dir / "ca.crt") if tls_dir is not None else None
    server = await GatewayServer.start("127.0.0.1:0", routes=routes, identity=identity)

    async def stop(grace: float) -> None:
        await server.stop(grace)
    return server.port, stop


def serve_main(argv: Sequence[str]) -> None:
    """Entry point of the server subprocesses."""
    parser = argparse.ArgumentParser(prog="python -m bench.gateway")
    parser.add_argument("--serve", choices=("runtime", "gateway", "round-robin-gateway"),
                        required=True)
    parser.add_argument("--backend", action="append", default=[], help="gateway: host:port")
    parser.add_argument("--stall-share", type=float, default=0.0,
                        help="runtime: share of calls made 50 ms late")
    parser.add_argument("--profile", metavar="FILE", help="write cProfile stats to FILE")
    parser.add_argument("--tls-dir", type=Path,
                        help="gateway: mutual TLS with gateway.crt/.key and ca.crt here")
    args = parser.parse_args(argv)
    start = (_start_stalling_runtime(args.stall_share) if args.serve == "runtime"
             else _start_gateway(args.backend, args.serve == "round-robin-gateway",
                                 args.tls_dir))
    run_server(serve_until_stdin_closes(start), args.profile)


# --- the client -------------------------------------------------------------------------

def _target(kind: str, channel: grpc.aio.Channel) -> Target:
    request = runtime_pb2.InvokeRequest(capability="echo", input_json=PAYLOAD)
    return Target(kind, runtime_pb2_grpc.CapabilityRuntimeStub(channel), request)


async def paced(targets: Sequence[Target], calls: int, rate: float) -> Run:
    """``calls`` calls started at ``rate`` per second whatever the answers do (open loop),
    each to the next target in turn; a latency counts from the call's scheduled start."""
    turn = itertools.cycle(targets)
    loop = asyncio.get_running_loop()
    origin = loop.time()

    async def one(due: float, target: Target) -> float:
        await asyncio.sleep(due - loop.time())
        await target.stub.Invoke(target.request)
        return loop.time() - due

    started = time.perf_counter()
    latencies = await asyncio.gather(*(one(origin + index / rate, next(turn))
                                       for index in range(calls)))
    return Run(calls / (time.perf_counter() - started), list(latencies))


async def compare(name: str, baseline: Target, subject: Target) -> dict[str, Any]:
    """``name`` = subject throughput / baseline throughput, 64 concurrent, after a warm-up,
    in alternating pairs."""
    warm = {}
    for target in (baseline, subject):
        await check_echo(target)
        warm[target.kind] = await run_concurrent(target, WARMUP_ROUNDS * CONCURRENCY)
    calls = calls_for(min(r.calls_per_s for r in warm.values()), CONCURRENCY,
                      seconds=RUN_SECONDS, least=MIN_CALLS, most=MAX_CALLS)
    runs: dict[str, list[Run]] = {baseline.kind: [], subject.kind: []}

    async def pair(scale: float) -> tuple[float, float]:
        count = max(CONCURRENCY, int(calls * scale) // CONCURRENCY * CONCURRENCY)
        for target in (baseline, subject):
            runs[target.kind].append(await run_concurrent(target, count))
        return runs[baseline.kind][-1].calls_per_s, runs[subject.kind][-1].calls_per_s

    found = await steady_pairs(pair, pairs=PAIRS, budget_s=BUDGET_SECONDS)
    return {**ratio_figures(name, found.ratios),
            **run_summary(baseline.kind, runs[baseline.kind]),
            **run_summary(subject.kind, runs[subject.kind]),
            "concurrency": CONCURRENCY, "calls": int(calls * found.scale)}


async def throughput(started: float) -> dict[str, Any]:
    """gateway_ratio: gateway to two runtimes vs one runtime directly, 64 concurrent."""
    async with (server_process("bench.runtime", "runtime") as first,
                server_process("bench.runtime", "runtime") as second,
                server_process("bench.gateway", "gateway", "--backend", f"127.0.0.1:{first}",
                               "--backend", f"127.0.0.1:{second}") as gateway,
                grpc.aio.insecure_channel(f"127.0.0.1:{first}") as direct_channel,
                grpc.aio.insecure_channel(f"127.0.0.1:{gateway}") as gateway_channel):
        return await compare("gateway_ratio", _target("direct", direct_channel),
                             _target("gateway", gateway_channel))


GATEWAY_WORKLOAD = ("bench", "gateway")


async def mtls_throughput() -> dict[str, Any]:
    """gateway_mtls_ratio: through the gateway with mutual TLS on both sides vs plaintext,
    each a gateway in front of two runtimes, 64 concurrent, alternating pairs."""
    from packetflow.identity.local import issue_files, local_authority
    from packetflow.identity.spiffe import Workload

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-gateway-mtls-") as directory:
        credentials = bench_certificates(Path(directory))
        gateway_id = Workload(*GATEWAY_WORKLOAD)
        issue_files(local_authority(Path(directory), "bench.local"), Path(directory),
                    "gateway", gateway_id, ip_addresses=("127.0.0.1",))
        secure = ["--tls-dir", directory, "--trusted-forwarder",
                  str(gateway_id.spiffe_id("bench.local"))]
        async with (server_process("bench.runtime", "runtime") as plain_a,
                    server_process("bench.runtime", "runtime") as plain_b,
                    server_process("bench.runtime", "mtls", *secure) as mtls_a,
                    server_process("bench.runtime", "mtls", *secure) as mtls_b,
                    server_process("bench.gateway", "gateway", "--backend",
                                   f"127.0.0.1:{plain_a}", "--backend",
                                   f"127.0.0.1:{plain_b}") as plain_gateway,
                    server_process("bench.gateway", "gateway", "--backend",
                                   f"127.0.0.1:{mtls_a}", "--backend", f"127.0.0.1:{mtls_b}",
                                   "--tls-dir", directory) as mtls_gateway,
                    grpc.aio.insecure_channel(f"127.0.0.1:{plain_gateway}") as plain_channel,
                    grpc.aio.secure_channel(f"127.0.0.1:{mtls_gateway}", credentials)
                    as mtls_channel):
            figures = await compare("gateway_mtls_ratio", _target("plaintext", plain_channel),
                                    _target("mtls", mtls_channel))
    return {**figures, "seconds": rounded(time.perf_counter() - started, 1)}


async def tail() -> dict[str, Any]:
    """tail_ratio: p99 through the gateway vs round robin (in the same gateway, and done by
    the client), one runtime of three stalling."""
    async with (server_process("bench.gateway", "runtime") as first,
                server_process("bench.gateway", "runtime") as second,
                server_process("bench.gateway", "runtime", "--stall-share",
                               str(STALL_SHARE)) as slowed):
        backends = [f"127.0.0.1:{port}" for port in (first, second, slowed)]
        args = [arg for backend in backends for arg in ("--backend", backend)]
        async with (server_process("bench.gateway", "gateway", *args) as gateway,
                    server_process("bench.gateway", "round-robin-gateway", *args) as plain):
            channels = [grpc.aio.insecure_channel(address) for address in
                        (*backends, f"127.0.0.1:{gateway}", f"127.0.0.1:{plain}")]
            try:
                *direct, through, baseline = [_target(kind, channel) for kind, channel in zip(
                    ("direct", "direct", "direct", "gateway", "round-robin"), channels,
                    strict=True)]
                modes = {"client_round_robin": direct, "round_robin": [baseline],
                         "gateway_tail": [through]}
                for targets in modes.values():
                    for target in targets:
                        await check_echo(target)
                    await paced(targets, TAIL_CALLS // 4, TAIL_RATE)
                runs: dict[str, list[Run]] = {mode: [] for mode in modes}
                vs_client: list[float] = []

                async def pair(scale: float) -> tuple[float, float]:
                    """(round-robin p99, gateway p99): the ratio is the gateway's over it."""
                    for mode, targets in modes.items():
                        runs[mode].append(await paced(targets, int(TAIL_CALLS * scale),
                                                      TAIL_RATE))
                    p99 = {mode: percentile(runs[mode][-1].latencies_s, 0.99)
                           for mode in modes}
                    vs_client.append(p99["gateway_tail"] / p99["client_round_robin"])
                    return p99["round_robin"], p99["gateway_tail"]

                found = await steady_pairs(pair, pairs=TAIL_PAIRS, budget_s=TAIL_BUDGET_SECONDS)
            finally:
                for channel in channels:
                    await channel.close()
    figures: dict[str, Any] = {**ratio_figures("tail_ratio", found.ratios),
                               **ratio_figures("tail_ratio_vs_client",
                                               vs_client[-len(found.ratios):])}
    for mode in modes:
        figures.update(run_summary(mode, runs[mode]))
    return {**figures, "tail_rate": TAIL_RATE, "tail_calls": int(TAIL_CALLS * found.scale)}


async def measure() -> dict[str, Any]:
    """Both comparisons."""
    started = time.perf_counter()
    figures = await throughput(started)
    figures.update(await tail())
    figures["seconds"] = rounded(time.perf_counter() - started, 1)
    return figures


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The bench's figures; with ``--mtls``, the zero-trust ratio instead."""
    parser = argparse.ArgumentParser(prog="python -m bench gateway")
    parser.add_argument("--mtls", action="store_true",
                        help="measure mutual TLS on both sides of the gateway against plaintext")
    args = parser.parse_args(argv or [])
    return asyncio.run(mtls_throughput() if args.mtls else measure())


if __name__ == "__main__":
    serve_main(sys.argv[1:])
