"""``python -m bench soak [--minutes N] [--seed S]``: mixed load for N minutes (default 3)
while faults are injected at random; one JSON object.

The load: a capability, a composition, a remote MCP tool (through a fault proxy) and durable
actor turns (numbered messages under message ids, retried until acknowledged) on one runtime
process whose actor store is a real PostgreSQL. The faults, one at a time with quiet spells
between: PostgreSQL crashed and restarted, the runtime killed with SIGKILL and restarted on the
same address, the MCP proxy stalled. Figures: calls by code, acknowledged actor messages,
``lost`` and ``applied_twice`` (both must be 0), p50/p99 of successful calls outside fault
windows, the recovery time after each fault (from its end until every kind of call succeeded
again), and the runtime's resident memory, open fds, threads and event-loop tasks at start
and end (after the last restart: "start" is the first process that served).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.request import urlopen

from bench.common import percentile, rounded
from packetflow.client import CallError, RuntimeClient
from tests.support.faultproxy import Fault, FaultProxy
from tests.support.ledger_load import LedgerLoad
from tests.support.mcp_remote_server import remote_server
from tests.support.postgres import PostgresServer
from tests.support.processes import RuntimeProcess, free_port

KINDS = ("capability", "composition", "mcp", "actor")
QUIET_SECONDS = (15.0, 30.0)  # between faults: recovery, then steady load measured
CALL_TIMEOUT = 5.0


def bundle(mcp: str) -> str:
    """The soak's manifests."""
    return f"""
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {{name: echo}}
spec:
  intent: Echo a number
  requires: {{n: {{type: integer}}}}
  implementation: {{builtin: {{name: echo}}}}
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {{name: twice}}
spec:
  intent: Echo a number through two steps
  requires: {{n: {{type: integer}}}}
  implementation:
    composition:
      steps:
        - call: {{capability: echo}}
        - call: {{capability: echo}}
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {{name: remote-tool}}
spec:
  intent: The remote MCP server's echo tool
  timeoutSeconds: 2
  implementation: {{mcp: {{url: "http://{mcp}/mcp", tool: echo}}}}
---
apiVersion: packetflow.io/v1alpha1
kind: Actor
metadata: {{name: ledger}}
spec:
  intent: Record numbers
  timeoutSeconds: 3
  implementation: {{python: {{module: tests.support.actor_handlers, class: Ledger}}}}
  store: {{postgresql: {{dsnFrom: {{env: PF_SOAK_DSN}}}}}}
"""


def process_figures(pid: int, metrics_port: int) -> dict[str, int]:
    """Resident memory, open fds, threads (from /proc) and event-loop tasks (its metric)."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    rss = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
    with urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    tasks = next(float(line.split()[-1]) for line in text.splitlines()
                 if line.startswith("packetflow_event_loop_tasks "))
    return {"rss_bytes": rss, "open_fds": len(list(Path(f"/proc/{pid}/fd").iterdir())),
            "threads": len(list(Path(f"/proc/{pid}/task").iterdir())), "tasks": int(tasks)}


class Soak:
    """The runtime under load, its dependencies and what was seen."""

    def __init__(self, work: Path, postgres: PostgresServer, proxy: FaultProxy,
                 dsn: str) -> None:
        self.work, self.postgres, self.proxy = work, postgres, proxy
        self.address = f"127.0.0.1:{free_port()}"
        self.metrics_port = free_port()
        self.env = {"PF_SOAK_DSN": dsn}
        self.runtime = self.start()
        self.client = RuntimeClient(self.address)
        self.calls: list[tuple[str, float, float, str]] = []  # kind, started, took, code
        self.stopping = asyncio.Event()
        self.restarts = 0

    def start(self) -> RuntimeProcess:
        """A runtime process on the soak's address."""
        return RuntimeProcess(self.work / "bundle", self.work / "state", self.work / "log",
                              self.env, address=self.address,
                              args=["--metrics-address", f"127.0.0.1:{self.metrics_port}"])

    async def caller(self, kind: str, name: str) -> None:
        """Call ``name`` in a loop, recording each outcome."""
        n = 0
        while not self.stopping.is_set():
            value: dict[str, Any] = {"message": str(n)} if kind == "mcp" else {"n": n}
            started = time.monotonic()
            try:
                await self.client.invoke(name, value, timeout=CALL_TIMEOUT)
                code = "OK"
            except CallError as exc:
                code = exc.code.name
            self.calls.append((kind, started, time.monotonic() - started, code))
            n += 1
            await asyncio.sleep(0.01 if code == "OK" else 0.1)

    async def recovered(self, since: float) -> float:
        """Seconds from ``since`` until every kind of call succeeded again."""
        while True:
            ok = {kind: min((s for k, s, _, code in self.calls if k == kind and code == "OK"
                             and s >= since), default=None) for kind in KINDS[:3]}
            acked = [s for s, _ in self.load.latencies if s >= since]
            if all(v is not None for v in ok.values()) and acked:
                return max([*(v for v in ok.values() if v is not None), min(acked)]) - since
            await asyncio.sleep(0.1)

    async def fault(self, kind: str) -> tuple[float, float]:
        """Inject one fault; returns (its start, its end) in monotonic time."""
        began = time.monotonic()
        if kind == "postgres_restart":
            await asyncio.to_thread(self.postgres.crash)
            await asyncio.sleep(3)
            await asyncio.to_thread(self.postgres.restart)
        elif kind == "runtime_kill9":
            await asyncio.to_thread(self.runtime.kill)
            self.runtime = await asyncio.to_thread(self.start)
            self.restarts += 1
        else:  # proxy_stall
            self.proxy.fault = Fault.stall()
            await asyncio.sleep(5)
            self.proxy.fault = None
        return began, time.monotonic()

    async def run(self, minutes: float, seed: int) -> dict[str, Any]:
        """Load and faults for ``minutes``; the figures."""
        rng = random.Random(seed)
        self.load = LedgerLoad("ledger", [f"actor-{i}" for i in range(4)], timeout=CALL_TIMEOUT)
        tasks = [asyncio.create_task(self.caller("capability", "echo")),
                 asyncio.create_task(self.caller("composition", "twice")),
                 asyncio.create_task(self.caller("mcp", "remote-tool")),
                 asyncio.create_task(self.load.run(lambda: self.client))]
        first_pid = self.runtime.process.pid
        await asyncio.sleep(2)  # warm: connections and pools open
        start = await asyncio.to_thread(process_figures, first_pid, self.metrics_port)
        ends = time.monotonic() + minutes * 60
        windows: list[tuple[str, float, float, float]] = []  # kind, start, end, recovered
        while time.monotonic() + QUIET_SECONDS[1] < ends:
            await asyncio.sleep(rng.uniform(*QUIET_SECONDS))
            kind = rng.choice(["postgres_restart", "runtime_kill9", "proxy_stall"])
            began, ended = await self.fault(kind)
            took = await asyncio.wait_for(self.recovered(ended), 120)
            windows.append((kind, began, ended, ended + took))
        await asyncio.sleep(max(0.0, ends - time.monotonic()))
        end = await asyncio.to_thread(process_figures, self.runtime.process.pid,
                                      self.metrics_port)
        self.stopping.set()
        self.load.stopping.set()
        await asyncio.gather(*tasks)
        lost, twice = await self.load.lost_and_twice(self.client)
        await self.client.close()

        def quiet(at: float) -> bool:
            return not any(began <= at <= back for _, began, _, back in windows)

        codes = collections.Counter(code for *_, code in self.calls)
        codes.update(self.load.codes)
        latencies = [took for _, at, took, code in self.calls if code == "OK" and quiet(at)]
        latencies += [took for at, took in self.load.latencies if quiet(at)]
        return {
            "bench": "soak", "minutes": minutes, "seed": seed,
            "calls_by_code": dict(codes),
            "calls_by_kind": dict(collections.Counter(kind for kind, *_ in self.calls)),
            "acked_actor_messages": self.load.total_acked(),
            "lost": lost, "applied_twice": twice,
            "p50_ms_outside_faults": rounded(percentile(latencies, 0.50) * 1e3),
            "p99_ms_outside_faults": rounded(percentile(latencies, 0.99) * 1e3),
            "faults": [{"kind": kind, "fault_s": rounded(ended - began),
                        "recovery_s": rounded(back - ended)}
                       for kind, began, ended, back in windows],
            "runtime_restarts": self.restarts,
            "start": start, "end": end,
        }


async def soak(minutes: float, seed: int) -> dict[str, Any]:
    """Start PostgreSQL, the remote MCP server, its proxy and the runtime; soak."""
    postgres = PostgresServer.start()
    try:
        async with contextlib.AsyncExitStack() as stack:
            url, _ = await stack.enter_async_context(remote_server())
            proxy = await stack.enter_async_context(FaultProxy(url.split("//")[1].split("/")[0]))
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pf-soak-")))
            (work / "bundle").mkdir()
            (work / "bundle" / "soak.yaml").write_text(bundle(proxy.address))
            bench = Soak(work, postgres, proxy, postgres.create_database())
            try:
                return await bench.run(minutes, seed)
            finally:
                bench.runtime.kill()
    finally:
        postgres.stop()


def run(argv: Sequence[str] = ()) -> dict[str, Any]:
    """The bench's figures (``--minutes N``, ``--seed S``)."""
    parser = argparse.ArgumentParser(prog="python -m bench soak")
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(list(argv))
    return asyncio.run(soak(args.minutes, args.seed))
