"""Federation overhead: an imported capability through both organizations' gateways over
mutual TLS, against the same capability called directly on its runtime in plaintext.

Four processes besides this client: globex's runtime (``echo``, the same server
``bench.runtime`` measures), globex's federation gateway exporting it, acme's gateway
importing it as ``globex-echo``. The client calls ``globex-echo`` at acme's gateway (local
port, plaintext) and, alternately, ``echo`` at the runtime; same 1 KiB payload, 32 calls in
flight, runs alternating in pairs (``bench.common.steady_pairs``). Reported:

- ``federation_ratio``: federated / direct throughput (median of the pairs, with spread);
- ``latency_ratio_p50`` and ``added_p50_ms``/``added_p99_ms``: sequential calls, federated
  minus direct, per pair;
- ``exporter_hop_ratio``: globex's gateway alone (a client with acme's certificate calling it
  over mTLS) / direct, to show what one gateway hop costs;
- ``handshake_ratio``: new mTLS connections per second completed by globex's gateway (TLS 1.3
  handshake, SPIFFE authentication, the relay set up) / by a bare Python TLS 1.3 server with
  the same certificates that only completes the handshake; ``handshakes_per_s`` for context.

Channels are reused (acme's gateway keeps one per peer): the run also reports how many
handshakes globex's gateway accepted in all (``gateway_handshakes``), which stays at a handful
while thousands of calls pass.

``python -m bench.federation --serve tls --dir DIR`` is the bare TLS server subprocess.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import orjson

from bench.common import (
    ROOT,
    START_TIMEOUT,
    Pairs,
    Run,
    calls_for,
    median,
    percentile,
    ratio_figures,
    rounded,
    run_summary,
    server_process,
    steady_pairs,
)
from bench.runtime import PAYLOAD, Target, check_echo, run_concurrent, run_sequential
from packetflow.identity.certs import issue, new_authority
from packetflow.identity.spiffe import SpiffeId
from packetflow.identity.tls import (
    channel_credentials,
    client_context,
    load_credentials,
    server_context,
)
from packetflow.v1 import federation_pb2_grpc, runtime_pb2, runtime_pb2_grpc

CONCURRENCY = 32
PAIRS = 9
RUN_SECONDS = 0.8
MIN_CALLS, MAX_CALLS = 320, 20_000
LATENCY_CALLS = 200
HANDSHAKES = 60
BUDGET_SECONDS = 150.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_organizations(directory: Path, runtime_port: int,
                        http_port: int) -> dict[str, Path]:
    """Certificates and gateway configs of acme (importer) and globex (exporter, its status
    on ``http_port``)."""
    ports = {name: (_free_port(), _free_port()) for name in ("acme", "globex")}
    for name in ("acme", "globex"):
        out = directory / name
        out.mkdir(parents=True)
        authority = new_authority(f"{name}.example", name)
        leaf = issue(authority, SpiffeId.of(f"{name}.example", "federation", "gateway"),
                     dns_names=["localhost"], ip_addresses=["127.0.0.1"])
        (out / "ca.crt").write_bytes(authority.certificate_pem)
        (out / "tls.crt").write_bytes(leaf.certificate_pem)
        (out / "tls.key").write_bytes(leaf.key_pem)
    configs = {}
    for name, other, role in (("globex", "acme", "exports"), ("acme", "globex", "imports")):
        listen, local = ports[name]
        terms = ("  exports:\n    - {capability: echo, to: [acme], "
                 "pricing: {perExecution: 0.001}}\n" if role == "exports" else
                 "  imports:\n    - {peer: globex, capability: echo, as: globex-echo}\n")
        configs[name] = directory / name / "federation.yaml"
        configs[name].write_text(
            "apiVersion: packetflow.io/v1alpha1\nkind: Federation\nmetadata: {name: bench}\n"
            f"spec:\n  organization: {name}\n  trustDomain: {name}.example\n"
            "  identity: {certFile: tls.crt, keyFile: tls.key}\n"
            f"  peers:\n    - name: {other}\n      organization: {other}\n"
            f"      trustDomain: {other}.example\n"
            f"      endpoint: 127.0.0.1:{ports[other][0]}\n"
            f"      trustBundle: {{file: ../{other}/ca.crt}}\n" + terms +
            # Evidence from thousands of calls a second must not lock the bench out.
            "  trust: {minimumScore: 0.1}\n"
            f"gateway:\n  listen: 127.0.0.1:{listen}\n  local: 127.0.0.1:{local}\n"
            f"  runtime: 127.0.0.1:{runtime_port}\n"
            f"  metrics_address: '{f'127.0.0.1:{http_port}' if role == 'exports' else ''}'\n"
            "  state_dir: state\n  catalog_refresh_seconds: 0.5\n  log_level: WARNING\n")
    return configs


@contextlib.asynccontextmanager
async def gateway_process(config: Path) -> AsyncIterator[tuple[int, int]]:
    """Run ``packetflow federation --config``; yield its (peer port, local port)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
        str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "packetflow.cli", "federation", "--config", str(config),
        stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL, env=env,
        cwd=config.parent)
    assert proc.stderr is not None
    try:
        ports: tuple[int, int] | None = None
        deadline = time.monotonic() + START_TIMEOUT
        while ports is None:
            line = (await asyncio.wait_for(proc.stderr.readline(),
                                           max(0.1, deadline - time.monotonic()))).decode()
            if not line:
                raise RuntimeError(f"gateway {config} did not start")
            if "peers on :" in line:
                peer = int(line.split("peers on :")[1].split(",")[0])
                local = int(line.split("local callers on :")[1].split(",")[0].split()[0])
                ports = (peer, local)
        drain = asyncio.ensure_future(proc.stderr.read())
        yield ports
        drain.cancel()
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _wait_ready(stub: runtime_pb2_grpc.CapabilityRuntimeStub) -> None:
    """Until acme's gateway has read globex's catalog and serves the import."""
    request = runtime_pb2.InvokeRequest(capability="globex-echo", input_json=PAYLOAD)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            await stub.Invoke(request, timeout=5)
            return
        except grpc.aio.AioRpcError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def handshakes(port: int, credentials_dir: Path, count: int) -> float:
    """New mTLS connections per second to ``port``, each completed and closed."""
    credentials = load_credentials(credentials_dir / "acme" / "tls.crt",
                                   credentials_dir / "acme" / "tls.key")
    context = client_context(credentials, (credentials_dir / "globex" / "ca.crt").read_bytes())
    started = time.perf_counter()
    for _ in range(count):
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
        writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await writer.wait_closed()
    return count / (time.perf_counter() - started)


async def _serve_tls(directory: Path) -> None:
    """A bare TLS 1.3 server with globex's credentials: handshake, nothing else."""
    credentials = load_credentials(directory / "globex" / "tls.crt",
                                   directory / "globex" / "tls.key")
    context = server_context(credentials, (directory / "acme" / "ca.crt").read_bytes())

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError, ssl.SSLError):
            await reader.read()
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0, ssl=context)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.to_thread(sys.stdin.read)
    server.close()


def _calls_for(rate: float, multiple: int) -> int:
    return calls_for(rate, multiple, seconds=RUN_SECONDS, least=MIN_CALLS, most=MAX_CALLS)


async def measure() -> dict[str, Any]:
    """Run the comparison and return its figures."""
    bench_started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-federation-") as temporary:
        directory = Path(temporary)
        async with server_process("bench.runtime", "runtime") as runtime_port:
            http_port = _free_port()
            configs = write_organizations(directory, runtime_port, http_port)
            async with (gateway_process(configs["globex"]) as (globex_peer, _),
                        gateway_process(configs["acme"]) as (_, acme_local),
                        server_process("bench.federation", "tls", "--dir", temporary)
                        as bare_tls_port,
                        grpc.aio.insecure_channel(f"127.0.0.1:{runtime_port}") as direct,
                        grpc.aio.insecure_channel(f"127.0.0.1:{acme_local}") as federated):
                targets = [
                    Target("direct", runtime_pb2_grpc.CapabilityRuntimeStub(direct),
                           runtime_pb2.InvokeRequest(capability="echo", input_json=PAYLOAD)),
                    Target("federated", runtime_pb2_grpc.CapabilityRuntimeStub(federated),
                           runtime_pb2.InvokeRequest(capability="globex-echo",
                                                     input_json=PAYLOAD))]
                await _wait_ready(targets[1].stub)
                for target in targets:
                    await check_echo(target)
                    await run_concurrent(target, CONCURRENCY * 10, CONCURRENCY)
                warm = await run_concurrent(targets[1], CONCURRENCY * 10, CONCURRENCY)
                calls = _calls_for(warm.calls_per_s, CONCURRENCY)
                runs: dict[str, list[Run]] = {"direct": [], "federated": []}

                async def pair(scale: float) -> tuple[float, float]:
                    count = max(CONCURRENCY, int(calls * scale) // CONCURRENCY * CONCURRENCY)
                    rates = []
                    for target in targets:
                        run = await run_concurrent(target, count, CONCURRENCY)
                        runs[target.kind].append(run)
                        rates.append(run.calls_per_s)
                    return rates[0], rates[1]

                throughput = await steady_pairs(pair, pairs=PAIRS, budget_s=BUDGET_SECONDS / 2)
                # Where the cost is: globex's gateway alone (a peer client with acme's
                # certificate), against the same direct calls.
                credentials = load_credentials(directory / "acme" / "tls.crt",
                                               directory / "acme" / "tls.key")
                async with grpc.aio.secure_channel(
                        f"127.0.0.1:{globex_peer}", channel_credentials(
                            credentials, (directory / "globex" / "ca.crt").read_bytes())
                        ) as hop_channel:
                    # The peer service's Invoke takes the runtime's own request message.
                    hop = Target("exporter", federation_pb2_grpc.FederationStub(  # type: ignore[arg-type]
                        hop_channel), targets[0].request)
                    await run_concurrent(hop, CONCURRENCY * 10, CONCURRENCY)

                    async def hop_pair(scale: float) -> tuple[float, float]:
                        count = max(CONCURRENCY,
                                    int(calls * scale) // CONCURRENCY * CONCURRENCY)
                        direct_run = await run_concurrent(targets[0], count, CONCURRENCY)
                        hop_run = await run_concurrent(hop, count, CONCURRENCY)
                        return direct_run.calls_per_s, hop_run.calls_per_s

                    one_hop = await steady_pairs(hop_pair, pairs=PAIRS,
                                                 budget_s=BUDGET_SECONDS / 4)
                latency: dict[str, list[Run]] = {"direct": [], "federated": []}
                for _ in range(PAIRS):
                    for target in targets:
                        latency[target.kind].append(await run_sequential(target,
                                                                         LATENCY_CALLS))
                call_handshakes = (await _status(http_port))["handshakes"]
                shakes: list[tuple[float, float]] = []
                for _ in range(PAIRS):
                    shakes.append((await handshakes(bare_tls_port, directory, HANDSHAKES),
                                   await handshakes(globex_peer, directory, HANDSHAKES)))
    figures = _figures(throughput, runs, latency, shakes, call_handshakes, bench_started, calls)
    return {**figures, **ratio_figures("exporter_hop_ratio", one_hop.ratios)}


async def _status(port: int) -> dict[str, Any]:
    """A gateway's /status."""
    import urllib.request

    def read() -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=10) as reply:
            found: dict[str, Any] = orjson.loads(reply.read())
            return found

    return await asyncio.to_thread(read)


def _figures(throughput: Pairs, runs: dict[str, list[Run]], latency: dict[str, list[Run]],
             shakes: list[tuple[float, float]], call_handshakes: int, started: float,
             calls: int) -> dict[str, Any]:
    added_p50 = [percentile(f.latencies_s, 0.5) - percentile(d.latencies_s, 0.5)
                 for d, f in zip(latency["direct"], latency["federated"], strict=True)]
    added_p99 = [percentile(f.latencies_s, 0.99) - percentile(d.latencies_s, 0.99)
                 for d, f in zip(latency["direct"], latency["federated"], strict=True)]
    p50_ratios = [percentile(d.latencies_s, 0.5) / percentile(f.latencies_s, 0.5)
                  for d, f in zip(latency["direct"], latency["federated"], strict=True)]
    figures: dict[str, Any] = {
        **ratio_figures("federation_ratio", throughput.ratios),
        **ratio_figures("latency_ratio_p50", p50_ratios),
        "added_p50_ms": rounded(median(added_p50) * 1e3),
        "added_p99_ms": rounded(median(added_p99) * 1e3),
        **ratio_figures("handshake_ratio", [ours / bare for bare, ours in shakes]),
        "handshakes_per_s": rounded(median([ours for _, ours in shakes]), 1),
        "bare_tls_handshakes_per_s": rounded(median([bare for bare, _ in shakes]), 1),
        **run_summary("direct_concurrent", runs["direct"]),
        **run_summary("federated_concurrent", runs["federated"]),
        # Handshakes globex's gateway accepted while every throughput and latency call went
        # through it: channel reuse keeps this at one or two.
        "call_handshakes": call_handshakes,
        "federated_calls": sum(len(r.latencies_s) for r in runs["federated"]
                               + latency["federated"]),
        "payload_bytes": len(PAYLOAD),
        "concurrency": CONCURRENCY,
        "calls_per_run": int(calls * throughput.scale),
        "seconds": rounded(time.perf_counter() - started, 1),
    }
    return figures


def run() -> dict[str, Any]:
    """The bench's figures."""
    return asyncio.run(measure())


def serve_main(argv: Sequence[str]) -> None:
    """Entry point of the bare TLS server subprocess."""
    parser = argparse.ArgumentParser(prog="python -m bench.federation")
    parser.add_argument("--serve", choices=("tls",), required=True)
    parser.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args(argv)
    asyncio.run(_serve_tls(args.dir))


if __name__ == "__main__":
    serve_main(sys.argv[1:])
