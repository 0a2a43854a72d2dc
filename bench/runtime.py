"""Runtime overhead: ``Invoke`` of ``echo`` through PacketFlow vs a bare ``grpc.aio`` echo.

Both servers speak the same ``packetflow.v1.CapabilityRuntime`` wire messages and get the same
1 KiB JSON payload; the bare one just hands ``input_json`` back, so the ratio of throughputs is
what PacketFlow's per-call work (resolve, decode, validate, run, validate, encode, metrics)
costs. Method:

- Each server runs in its own subprocess so it does not share a core (or a GIL) with the
  client; both stay up for the whole bench, and an idle gRPC server costs next to nothing.
- The client (this process) uses one ``grpc.aio`` channel per server, warms up first, and
  makes the same number of calls to each.
- Runs alternate (bare, runtime, bare, runtime, ...); each ratio is the median of the ratios
  of adjacent pairs, so slow drift of a shared machine cancels instead of favouring one side.
- Call counts are calibrated from the warm-up so each run lasts about ``RUN_SECONDS``; when
  one pair's ratio varies by more than 10% (a busy machine), the pairs are measured again
  with runs twice as long, within ``BUDGET_SECONDS`` (about 40 s on a quiet machine).

``python -m bench.runtime --serve bare|runtime [--profile FILE]`` is the server subprocess:
it prints its port, serves until its stdin closes and, with ``--profile``, writes cProfile
stats of the whole serving time to FILE (how the runtime's per-call costs were found).

``python -m bench runtime --mtls`` measures zero trust instead: ``mtls_ratio`` = throughput
of the runtime with mutual TLS and authorization (gRPC's native TLS 1.3, client certificate
of the bench's workload, an ``access`` rule admitting it) / throughput of the same runtime in
plaintext, 64 concurrent calls on one reused channel each (no handshake per call), both in
the same run, alternating pairs. Target >= 0.8. ``--serve mtls --tls-dir DIR`` is its server.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import orjson

from bench.common import (
    Pairs,
    Run,
    calls_for,
    ratio_figures,
    rounded,
    run_server,
    run_summary,
    serve_until_stdin_closes,
    server_process,
    steady_pairs,
)
from packetflow.v1 import runtime_pb2, runtime_pb2_grpc

# {"message": "xxx..."}: exactly 1024 bytes of JSON (14 bytes of framing + 1010 characters).
PAYLOAD = orjson.dumps({"message": "x" * 1010})
CONCURRENCY = 64
PAIRS = 15  # alternating bare/runtime pairs per mode; the ratios are their median
RUN_SECONDS = 0.6  # target length of one runtime run: short runs, many pairs, so a burst
# of load from other processes spoils a few pairs (which the median drops), not the result
MIN_CALLS, MAX_CALLS = 640, 20_000
WARMUP_SEQUENTIAL = 200
WARMUP_CONCURRENT_ROUNDS = 10  # CONCURRENCY calls each
BUDGET_SECONDS = 100.0  # both modes: runs lengthen (variation > 10%) only within this

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
# The zero-trust runtime's echo: the bench's client is admitted by a rule (and one deny rule
# is checked first), so every call pays for a real authorization.
MTLS_MANIFEST = ECHO_MANIFEST + """\
  access:
    allow: [{serviceAccount: bench/client}]
    deny: [{namespace: elsewhere}]
"""



# --- the server subprocess --------------------------------------------------------------

class BareEcho(runtime_pb2_grpc.CapabilityRuntimeServicer):
    """The baseline: the same wire messages, no PacketFlow logic at all.

    Only ``Invoke`` is measured; the other methods exist because the stubs declare them
    abstract, and refuse as an unimplemented gRPC method would.
    """

    async def Invoke(self, request: runtime_pb2.InvokeRequest,
                     context: grpc.aio.ServicerContext[Any, Any]) -> runtime_pb2.InvokeResponse:
        return runtime_pb2.InvokeResponse(output_json=request.input_json)

    async def InvokeStream(self, request: runtime_pb2.InvokeRequest,
                           context: grpc.aio.ServicerContext[Any, Any]
                           ) -> AsyncIterator[runtime_pb2.InvokeEvent]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not part of the baseline")
        yield runtime_pb2.InvokeEvent()  # unreachable; makes this an async generator

    async def ListCapabilities(self, request: runtime_pb2.ListCapabilitiesRequest,
                               context: grpc.aio.ServicerContext[Any, Any]
                               ) -> runtime_pb2.ListCapabilitiesResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not part of the baseline")
        raise AssertionError("unreachable: abort raises")

    async def DescribeCapability(self, request: runtime_pb2.DescribeCapabilityRequest,
                                 context: grpc.aio.ServicerContext[Any, Any]
                                 ) -> runtime_pb2.CapabilityDescription:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not part of the baseline")
        raise AssertionError("unreachable: abort raises")


async def _start_bare() -> tuple[int, Any]:
    server = grpc.aio.server()
    runtime_pb2_grpc.add_CapabilityRuntimeServicer_to_server(BareEcho(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return port, server.stop


async def _start_runtime(tls_dir: Path | None = None,
                         trusted_forwarders: Sequence[str] = ()) -> tuple[int, Any]:
    # Imported here so the bare server's process never loads PacketFlow.
    from packetflow.engine import Engine
    from packetflow.manifests import load_text
    from packetflow.serve import secure_engine
    from packetflow.server import RuntimeServer
    from packetflow.settings import RuntimeSettings

    loaded = load_text(MTLS_MANIFEST if tls_dir else ECHO_MANIFEST, "bench/runtime.py")
    if loaded.errors:
        raise SystemExit("; ".join(map(str, loaded.errors)))
    engine = Engine(loaded.capabilities)
    if engine.load_errors:
        raise SystemExit("; ".join(map(str, engine.load_errors)))
    if tls_dir is not None:
        secure_engine(engine, RuntimeSettings(
            tls_cert=tls_dir / "server.crt", tls_key=tls_dir / "server.key",
            tls_ca=tls_dir / "ca.crt", metrics_address=None,
            trusted_forwarders=list(trusted_forwarders)))
    server = await RuntimeServer.start(engine, "127.0.0.1:0")
    return server.port, server.server.stop


def serve_main(argv: Sequence[str]) -> None:
    """Entry point of the server subprocess."""
    parser = argparse.ArgumentParser(prog="python -m bench.runtime")
    parser.add_argument("--serve", choices=("bare", "runtime", "mtls"), required=True)
    parser.add_argument("--tls-dir", type=Path, help="with --serve mtls: the certificates")
    parser.add_argument("--trusted-forwarder", action="append", default=[],
                        help="with --serve mtls: a SPIFFE ID whose packetflow-caller counts")
    parser.add_argument("--profile", metavar="FILE", help="write cProfile stats to FILE")
    args = parser.parse_args(argv)
    start = (_start_bare() if args.serve == "bare" else
             _start_runtime(args.tls_dir if args.serve == "mtls" else None,
                            args.trusted_forwarder))
    run_server(serve_until_stdin_closes(start), args.profile)


# --- the client ---------------------------------------------------------------------------

@dataclass
class Target:
    """One server under test, as the client sees it."""

    kind: str
    stub: runtime_pb2_grpc.CapabilityRuntimeStub
    request: runtime_pb2.InvokeRequest


async def _call(target: Target) -> float:
    started = time.perf_counter()
    await target.stub.Invoke(target.request)
    return time.perf_counter() - started


async def run_sequential(target: Target, calls: int) -> Run:
    """``calls`` calls, each waiting for the previous one."""
    latencies: list[float] = []
    started = time.perf_counter()
    for _ in range(calls):
        latencies.append(await _call(target))
    return Run(calls / (time.perf_counter() - started), latencies)


async def run_concurrent(target: Target, calls: int, concurrency: int = CONCURRENCY) -> Run:
    """``calls`` calls from ``concurrency`` workers, each calling back to back."""
    async def worker(count: int) -> list[float]:
        return [await _call(target) for _ in range(count)]

    per_worker = calls // concurrency
    started = time.perf_counter()
    results = await asyncio.gather(*(worker(per_worker) for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies = [latency for result in results for latency in result]
    return Run(len(latencies) / elapsed, latencies)


async def check_echo(target: Target) -> None:
    """Both servers must actually echo, or the comparison means nothing."""
    response = await target.stub.Invoke(target.request)
    if orjson.loads(response.output_json) != orjson.loads(PAYLOAD):
        raise RuntimeError(f"{target.kind} server did not echo the payload")


def _calls_for(rate: float, multiple: int) -> int:
    return calls_for(rate, multiple, seconds=RUN_SECONDS, least=MIN_CALLS, most=MAX_CALLS)


async def measure() -> dict[str, Any]:
    """Run the whole comparison and return its figures."""
    bench_started = time.perf_counter()
    async with (server_process("bench.runtime", "bare") as bare_port,
                server_process("bench.runtime", "runtime") as rt_port,
                grpc.aio.insecure_channel(f"127.0.0.1:{bare_port}") as bare_channel,
                grpc.aio.insecure_channel(f"127.0.0.1:{rt_port}") as rt_channel):
        request = runtime_pb2.InvokeRequest(capability="echo", input_json=PAYLOAD)
        targets = [Target("bare", runtime_pb2_grpc.CapabilityRuntimeStub(bare_channel), request),
                   Target("runtime", runtime_pb2_grpc.CapabilityRuntimeStub(rt_channel), request)]

        # Warm up connections, caches and the servers' code paths; the runtime's (slower)
        # warm-up rates size the runs, and both servers then get the same counts.
        warm: dict[str, tuple[Run, Run]] = {}
        for target in targets:
            await check_echo(target)
            warm[target.kind] = (
                await run_sequential(target, WARMUP_SEQUENTIAL),
                await run_concurrent(target, WARMUP_CONCURRENT_ROUNDS * CONCURRENCY))
        sequential_calls = _calls_for(min(w[0].calls_per_s for w in warm.values()), 1)
        concurrent_calls = _calls_for(min(w[1].calls_per_s for w in warm.values()), CONCURRENCY)

        runs: dict[tuple[str, str], list[Run]] = {}
        found: dict[str, Pairs] = {}
        for mode, calls in (("sequential", sequential_calls), ("concurrent", concurrent_calls)):
            async def pair(scale: float, mode: str = mode, calls: int = calls
                           ) -> tuple[float, float]:
                rates = []
                for target in targets:  # bare, then runtime
                    count = int(calls * scale) // CONCURRENCY * CONCURRENCY or CONCURRENCY
                    run = (await run_sequential(target, count) if mode == "sequential"
                           else await run_concurrent(target, count))
                    runs.setdefault((target.kind, mode), []).append(run)
                    rates.append(run.calls_per_s)
                return rates[0], rates[1]

            found[mode] = await steady_pairs(pair, pairs=PAIRS, budget_s=BUDGET_SECONDS / 2)

    figures: dict[str, Any] = {
        **ratio_figures("sequential_ratio", found["sequential"].ratios),
        **ratio_figures("concurrent_ratio", found["concurrent"].ratios),
    }
    for mode in ("sequential", "concurrent"):
        for kind in ("bare", "runtime"):
            figures.update(run_summary(f"{kind}_{mode}", runs[(kind, mode)]))
    figures.update({
        "payload_bytes": len(PAYLOAD),
        "concurrency": CONCURRENCY,
        "sequential_calls": int(sequential_calls * found["sequential"].scale),
        "concurrent_calls": int(concurrent_calls * found["concurrent"].scale),
        "seconds": rounded(time.perf_counter() - bench_started, 1),
    })
    return figures


def bench_certificates(directory: Path) -> grpc.ChannelCredentials:
    """A local authority in ``directory``, the server's certificate (``server.*``) and the
    client's credentials, as the workload ``bench/client``."""
    from packetflow.identity.local import issue_files, local_authority
    from packetflow.identity.spiffe import Workload

    authority = local_authority(directory, "bench.local")
    issue_files(authority, directory, "server", Workload("bench", "runtime"),
                ip_addresses=("127.0.0.1",))
    client = issue_files(authority, directory, "client", Workload("bench", "client"))
    return grpc.ssl_channel_credentials(client.ca.read_bytes(), client.key.read_bytes(),
                                        client.cert.read_bytes())


async def measure_mtls() -> dict[str, Any]:
    """Plaintext runtime vs mTLS + authorization runtime, 64 concurrent, alternating pairs."""
    bench_started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-mtls-") as directory:
        credentials = bench_certificates(Path(directory))
        async with (server_process("bench.runtime", "runtime") as plain_port,
                    server_process("bench.runtime", "mtls", "--tls-dir", directory)
                    as mtls_port,
                    grpc.aio.insecure_channel(f"127.0.0.1:{plain_port}") as plain_channel,
                    grpc.aio.secure_channel(f"127.0.0.1:{mtls_port}", credentials)
                    as mtls_channel):
            request = runtime_pb2.InvokeRequest(capability="echo", input_json=PAYLOAD)
            targets = [
                Target("plaintext", runtime_pb2_grpc.CapabilityRuntimeStub(plain_channel),
                       request),
                Target("mtls", runtime_pb2_grpc.CapabilityRuntimeStub(mtls_channel), request)]
            warm = []
            for target in targets:
                await check_echo(target)
                warm.append(await run_concurrent(target, WARMUP_CONCURRENT_ROUNDS
                                                 * CONCURRENCY))
            calls = _calls_for(min(run.calls_per_s for run in warm), CONCURRENCY)
            runs: dict[str, list[Run]] = {"plaintext": [], "mtls": []}

            async def pair(scale: float) -> tuple[float, float]:
                rates = []
                for target in targets:  # plaintext, then mTLS
                    count = int(calls * scale) // CONCURRENCY * CONCURRENCY or CONCURRENCY
                    run = await run_concurrent(target, count)
                    runs[target.kind].append(run)
                    rates.append(run.calls_per_s)
                return rates[0], rates[1]

            found = await steady_pairs(pair, pairs=PAIRS, budget_s=BUDGET_SECONDS / 2)
    return {
        **ratio_figures("mtls_ratio", found.ratios),
        **run_summary("plaintext_concurrent", runs["plaintext"]),
        **run_summary("mtls_concurrent", runs["mtls"]),
        "payload_bytes": len(PAYLOAD),
        "concurrency": CONCURRENCY,
        "concurrent_calls": int(calls * found.scale),
        "seconds": rounded(time.perf_counter() - bench_started, 1),
    }


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The bench's figures: ratios (runtime / bare throughput), latencies, context; with
    ``--mtls``, the zero-trust ratio (mTLS + authorization / plaintext) instead."""
    parser = argparse.ArgumentParser(prog="python -m bench runtime")
    parser.add_argument("--mtls", action="store_true",
                        help="measure mutual TLS + authorization against plaintext")
    args = parser.parse_args(argv or [])
    return asyncio.run(measure_mtls() if args.mtls else measure())


if __name__ == "__main__":
    serve_main(sys.argv[1:])
