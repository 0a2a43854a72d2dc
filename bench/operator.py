"""Operator at scale: N Capabilities applied at once against the Kubernetes emulator.

The emulator (kmock over HTTP, with the test fixture's API-server behaviour: resourceVersions,
watch replay and bookmarks, label selectors, 409s, no-op patches) runs in a subprocess, as an
API server runs apart from its clients; a fresh one for every run. The real kopf operator runs
in this process, in its own thread and event loop (as in the tests), and a kubectl process
(started beforehand; timed from its first POST) creates N Capabilities, CONCURRENCY at a time.
The baseline is a bare client (the operator's own HTTP client) creating the same children,
rendered beforehand, with the same concurrency. Runs alternate in pairs (baseline first, then
operator first); for each N in SIZES the figures are:

- ``operator_ratio_n{N}`` (and ``_min``, ``_max``, ``_variation``, ``_pairs``): seconds from the
  first Capability POST until every child exists, over the bare client's seconds for the same
  children (the bench's one speed figure; target <= 2);
- ``reconciles_per_capability_n{N}``: reconciles (kopf handler runs and queued ones) until every
  status is written and every child event handled, per Capability (target <= 2);
- ``api_calls_per_capability_n{N}``, ``writes_per_capability_n{N}``: the operator's requests
  (kopf's and its client's, told apart by User-Agent) over the same span (target <= 4 writes);
- ``cpu_ms_per_capability_n{N}``: CPU time of the operator's thread over that span;
- ``emulator_cpu_ratio_n{N}``: the emulator's CPU seconds while the operator's children
  were made (its own requests and kubectl's, the watches' events) over its CPU seconds
  for the bare client's (the API server's share of the cost);
- ``floor_ratio_n{N}``: the same for the least a controller can do (:class:`FloorController`:
  the operator's client and watches, each Capability's pre-rendered children in the
  operator's two phases, nothing else), a third run in every pair; what the API server, the
  kubectl process and this machine's cores cost whatever the controller does, so
  ``operator_over_floor_n{N}`` (operator seconds over floor seconds) is the operator's own share;
- ``state_kib_per_capability_n{N}``: what the operator keeps in memory per Capability;
- ``resync_writes_n{N}``, ``resync_calls_n{N}``: one resync of the N unchanged Capabilities
  (target: 0 writes);
- ``operator_s_n{N}``, ``bare_s_n{N}``: the medians behind the ratio, for context.

Counts are medians over the pairs (they hardly vary); ``load_1m_start``/``load_1m_end`` are the
machine's load average around the run. The bench process's garbage collector is set as
``packetflow operator`` sets its own (:func:`settle_heap`), for both sides alike.
``PACKETFLOW_BENCH_OPERATOR_SIZES`` (default ``300,1000``) and
``PACKETFLOW_BENCH_OPERATOR_PAIRS`` (default 3) size the run.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import kopf
from prometheus_client import CollectorRegistry

from bench.common import (
    ROOT,
    START_TIMEOUT,
    median,
    ratio_figures,
    rounded,
    server_process,
)
from packetflow.operator import render
from packetflow.operator.client import PLURALS, KubeClient
from packetflow.operator.handlers import OperatorContext, OperatorThread
from packetflow.operator.heap import settle_heap
from packetflow.operator.metrics import OperatorMetrics
from packetflow.operator.reconcile import MANAGED_SELECTOR, apply_phases
from packetflow.operator.settings import OperatorSettings
from packetflow.operator.watching import WatchTarget, watch_forever
from packetflow.spec import API_VERSION, Capability

# The emulator with kmock's gaps filled lives with the tests that need it (DESIGN.md).
from tests.operator.kube_emulator import CONTROL_PATH, write_kubeconfig, writes

SIZES = tuple(int(size) for size in
              os.environ.get("PACKETFLOW_BENCH_OPERATOR_SIZES", "300,1000").split(","))
PAIRS = int(os.environ.get("PACKETFLOW_BENCH_OPERATOR_PAIRS", "3"))
CONCURRENCY = 50
NAMESPACE = "default"
TIMEOUT = 600.0
SETTINGS = OperatorSettings(liveness_address=None, operator_metrics_address=None,
                            resync_seconds=0)


def _manifest(index: int) -> dict[str, Any]:
    return {"apiVersion": "packetflow.io/v1alpha1", "kind": "Capability",
            "metadata": {"name": f"cap-{index:04d}", "namespace": NAMESPACE},
            "spec": {"intent": f"Echo number {index}", "requires": {"message": {"type": "string"}},
                     "implementation": {"builtin": {"name": "echo"}}, "replicas": 1}}


def _children(count: int) -> list[dict[str, Any]]:
    """What the operator writes for ``count`` Capabilities, with an owner reference as its
    children carry (the same bytes on the wire)."""
    children = []
    for index in range(count):
        capability = Capability.model_validate(_manifest(index))
        owner = {"apiVersion": "packetflow.io/v1alpha1", "kind": "Capability",
                 "name": capability.name, "uid": f"00000000-0000-0000-0000-{index:012d}",
                 "controller": True, "blockOwnerDeletion": True}
        for child in render.desired_children(capability, NAMESPACE, SETTINGS):
            child["metadata"]["ownerReferences"] = [owner]
            children.append(child)
    return children


def _resource(obj: Mapping[str, Any]) -> str:
    """A child's resource as the emulator names it (``apps/v1/deployments``)."""
    return f"{obj['apiVersion']}/{PLURALS[(obj['apiVersion'], obj['kind'])]}"


async def _create_all(url: str, objects: list[dict[str, Any]], agent: str) -> float:
    """POST every object, CONCURRENCY at a time; the seconds taken."""
    client = KubeClient(connections=CONCURRENCY, user_agent=agent)
    client.configure(kopf.ConnectionInfo(server=url))
    semaphore = asyncio.Semaphore(CONCURRENCY)

    async def create(obj: dict[str, Any]) -> None:
        async with semaphore:
            await client.create(obj)
    try:
        start = time.perf_counter()
        await asyncio.gather(*(create(obj) for obj in objects))
        return time.perf_counter() - start
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def _emulator() -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    """A fresh emulator subprocess: its URL and a session for its control endpoints."""
    async with server_process("tests.operator.kube_emulator", "emulator") as port:
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession(base_url=url) as control:
            yield url, control


async def _control(control: aiohttp.ClientSession, path: str, **params: str) -> Any:
    async with control.get(f"{CONTROL_PATH}/{path}", params=params,
                           timeout=aiohttp.ClientTimeout(total=TIMEOUT + 30)) as response:
        response.raise_for_status()
        return await response.json()


async def _calls(control: aiohttp.ClientSession, since: int) -> tuple[Counter[str], int]:
    """The operator's requests since log position ``since``, and the position now."""
    answer = await _control(control, "calls", since=str(since))
    return collections.Counter(answer["calls"]), int(answer["log"])


async def _emulator_cpu(control: aiohttp.ClientSession) -> float:
    """The emulator process's CPU seconds so far (asked from past the log's end: nothing
    to count)."""
    return float((await _control(control, "calls", since="1000000000"))["cpu_s"])


async def _until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {TIMEOUT}s waiting for {what}")
        await asyncio.sleep(0.02)


def _total(metrics: OperatorMetrics, name: str, **labels: str) -> float:
    return sum(sample.value for family in metrics.registry.collect()
               for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v
                                               for k, v in labels.items()))


async def _thread_cpu() -> float:
    return time.thread_time()


def _deep_size(root: Any) -> int:
    """Bytes held by an object graph (dicts, sequences, objects' attributes), each once."""
    seen: set[int] = set()
    pending = [root]
    size = 0
    while pending:
        obj = pending.pop()
        if id(obj) in seen or isinstance(obj, type | asyncio.AbstractEventLoop):
            continue
        seen.add(id(obj))
        size += sys.getsizeof(obj)
        if isinstance(obj, Mapping):
            pending.extend(obj.keys())
            pending.extend(obj.values())
        elif isinstance(obj, list | tuple | set | frozenset | collections.deque):
            pending.extend(obj)
        elif dataclasses.is_dataclass(obj) or hasattr(obj, "__dict__"):
            pending.extend(vars(obj).values())
    return size


@contextlib.asynccontextmanager
async def _kubectl(url: str, count: int) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """kubectl in a process of its own, as it runs apart from the operator (in this process
    it would take the GIL from the operator's thread): started and ready, it creates the
    Capabilities when the function yielded is awaited; the block waits for it to finish."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.operator", "--kubectl", url, str(count),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env, cwd=ROOT)
    assert proc.stdin is not None and proc.stdout is not None
    stdin = proc.stdin

    async def go() -> None:
        stdin.write(b"go\n")
        await stdin.drain()
    try:
        if (await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)).strip() != b"ready":
            raise RuntimeError(f"kubectl did not start (exit code {await proc.wait()})")
        yield go
        if await asyncio.wait_for(proc.wait(), TIMEOUT) != 0:
            raise RuntimeError(f"kubectl failed (exit code {proc.returncode})")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _kubectl_main(url: str, count: int) -> None:
    """The kubectl process: ready, then on ``go`` create ``count`` Capabilities."""
    manifests = [_manifest(index) for index in range(count)]
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    await _create_all(url, manifests, "bench-kubectl/1")


@dataclasses.dataclass
class OperatorRun:
    """One operator run's figures."""

    seconds: float
    reconciles: float
    calls: Counter[str]
    cpu_s: float
    state_bytes: int
    resync: Counter[str]
    emulator_cpu_s: float


async def _operator_run(count: int) -> OperatorRun:
    expected = collections.Counter(_resource(child) for child in _children(count))
    want = ",".join(f"{resource}:{number}" for resource, number in expected.items())
    async with _emulator() as (url, control):
        previous = os.environ.get("KUBECONFIG")
        os.environ["KUBECONFIG"] = str(write_kubeconfig(Path(tempfile.mkdtemp()) / "kubeconfig",
                                                        url))
        metrics = OperatorMetrics(registry=CollectorRegistry())
        thread = OperatorThread(OperatorContext.create(SETTINGS, metrics), namespaces=[NAMESPACE])
        await asyncio.to_thread(thread.start)
        reconciler = thread.ctx.reconciler
        try:
            _, mark = await _calls(control, 0)
            async with _kubectl(url, count) as go:
                cpu = await asyncio.to_thread(thread.call, _thread_cpu())
                emulator_cpu = await _emulator_cpu(control)
                start = time.perf_counter()
                await go()
                await _control(control, "wait", want=want, namespace=NAMESPACE,
                               timeout=str(TIMEOUT))
                seconds = time.perf_counter() - start
                emulator_cpu = await _emulator_cpu(control) - emulator_cpu
            await _until(lambda: _total(metrics, "packetflow_operator_reconciles_total",
                                        trigger="create") >= count, "every status")
            await _until(lambda: _total(metrics, "packetflow_operator_child_events_total")
                         >= sum(expected.values()) and thread.ctx.pending == 0,
                         "every child event handled")
            cpu = await asyncio.to_thread(thread.call, _thread_cpu()) - cpu
            calls, mark = await _calls(control, mark)
            reconciles = _total(metrics, "packetflow_operator_reconciles_total")
            state_bytes = _deep_size(reconciler.states)
            await asyncio.to_thread(thread.call, reconciler.resync())
            await _until(lambda: thread.ctx.pending == 0, "the resync's reconciles")
            resync, _ = await _calls(control, mark)
        finally:
            await asyncio.to_thread(thread.stop)
            if previous is None:
                os.environ.pop("KUBECONFIG", None)
            else:
                os.environ["KUBECONFIG"] = previous
    return OperatorRun(seconds, reconciles, calls, cpu, state_bytes, resync, emulator_cpu)


@dataclasses.dataclass
class _Added:
    """A watch sink: ``on_added`` with each new object's name; ``first_list`` set once
    listed."""

    on_added: Callable[[str], None]
    first_list: threading.Event

    def listed(self, objects: list[dict[str, Any]]) -> None:
        self.first_list.set()

    def changed(self, event_type: str, obj: dict[str, Any]) -> None:
        if event_type == "ADDED":
            self.on_added(obj["metadata"]["name"])


class _Ignored:
    """A watch sink that reads every event and keeps none (the floor's children watches)."""

    def listed(self, objects: list[dict[str, Any]]) -> None:
        pass

    def changed(self, event_type: str, obj: dict[str, Any]) -> None:
        pass


class FloorController:
    """The least a controller can do for the operator's result, in a thread of this process
    as the operator runs: its client, its watches (Capabilities; the children by the managed
    label, events read and dropped), and for each new Capability its children, rendered
    beforehand, created in the operator's two phases. No validation, rendering, state, status
    or drift checks: what is left is the cost of the API calls and events themselves."""

    def __init__(self, url: str, children: list[dict[str, Any]]) -> None:
        self.url = url
        self.children: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        for child in children:
            self.children[child["metadata"]["ownerReferences"][0]["name"]].append(child)
        self._client = KubeClient(user_agent="bench-floor/1")
        self._listed = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._main: asyncio.Task[None] | None = None
        self._creating: set[asyncio.Task[None]] = set()
        self._thread = threading.Thread(target=self._main_thread, daemon=True)

    def start(self) -> None:
        """Start, and wait until the Capabilities are listed (watched from then on)."""
        self._thread.start()
        if not self._listed.wait(START_TIMEOUT):
            raise TimeoutError("the floor controller did not list the Capabilities")

    def stop(self) -> None:
        """Stop the watches and the thread."""
        if self._loop is not None and self._main is not None:
            self._loop.call_soon_threadsafe(self._main.cancel)
        self._thread.join(START_TIMEOUT)

    def _main_thread(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):  # stop() cancels it
            asyncio.run(self._run())

    async def _run(self) -> None:
        self._loop, self._main = asyncio.get_running_loop(), asyncio.current_task()
        self._client.configure(kopf.ConnectionInfo(server=self.url))
        kinds = {(child["apiVersion"], child["kind"]) for child in _children(1)}
        try:
            await asyncio.gather(
                watch_forever(self._client, WatchTarget(API_VERSION, "Capability", NAMESPACE),
                              _Added(self._spawn, self._listed)),
                *(watch_forever(self._client, WatchTarget(api_version, kind, NAMESPACE,
                                                          MANAGED_SELECTOR), _Ignored())
                  for api_version, kind in sorted(kinds)))
        finally:
            await self._client.aclose()

    def _spawn(self, name: str) -> None:
        task = asyncio.get_running_loop().create_task(self._create(name))
        self._creating.add(task)
        task.add_done_callback(self._creating.discard)

    async def _create(self, name: str) -> None:
        mine = {(child["kind"], child["metadata"]["name"]): child
                for child in self.children[name]}
        for phase in apply_phases(mine):
            await asyncio.gather(*(self._client.create(mine[key]) for key in phase))


async def _floor_run(count: int, children: list[dict[str, Any]]) -> float:
    """Seconds from the first Capability POST until every child exists, with the
    :class:`FloorController` in place of the operator."""
    want = ",".join(f"{resource}:{number}" for resource, number in
                    collections.Counter(_resource(child) for child in children).items())
    async with _emulator() as (url, control):
        floor = FloorController(url, children)
        await asyncio.to_thread(floor.start)
        try:
            async with _kubectl(url, count) as go:
                start = time.perf_counter()
                await go()
                await _control(control, "wait", want=want, namespace=NAMESPACE,
                               timeout=str(TIMEOUT))
                return time.perf_counter() - start
        finally:
            await asyncio.to_thread(floor.stop)


async def _bare_run(children: list[dict[str, Any]]) -> tuple[float, float]:
    """The bare client's seconds, and the emulator's CPU seconds meanwhile."""
    async with _emulator() as (url, control):
        emulator_cpu = await _emulator_cpu(control)
        seconds = await _create_all(url, children, "bench-bare-client/1")
        return seconds, await _emulator_cpu(control) - emulator_cpu


def _size_figures(count: int) -> dict[str, Any]:
    children = _children(count)
    bare: list[float] = []
    bare_emulator_cpu: list[float] = []
    floor: list[float] = []
    runs: list[OperatorRun] = []

    def run_bare() -> None:
        seconds, cpu = asyncio.run(_bare_run(children))
        bare.append(seconds)
        bare_emulator_cpu.append(cpu)
    order = [run_bare, lambda: runs.append(asyncio.run(_operator_run(count))),
             lambda: floor.append(asyncio.run(_floor_run(count, children)))]
    for pair in range(PAIRS):
        for run in order if pair % 2 == 0 else reversed(order):
            run()
    suffix = f"_n{count}"

    def per_capability(values: Iterable[float]) -> float:
        return median([value / count for value in values])
    return {
        **ratio_figures(f"operator_ratio{suffix}",
                        [run.seconds / base for run, base in zip(runs, bare, strict=True)]),
        **ratio_figures(f"floor_ratio{suffix}",
                        [least / base for least, base in zip(floor, bare, strict=True)]),
        **ratio_figures(f"operator_over_floor{suffix}",
                        [run.seconds / least for run, least in zip(runs, floor, strict=True)]),
        f"reconciles_per_capability{suffix}": rounded(per_capability(r.reconciles
                                                                     for r in runs)),
        f"api_calls_per_capability{suffix}": rounded(per_capability(
            sum(r.calls.values()) for r in runs)),
        f"writes_per_capability{suffix}": rounded(per_capability(writes(r.calls)
                                                                 for r in runs)),
        f"cpu_ms_per_capability{suffix}": rounded(per_capability(r.cpu_s * 1000
                                                                 for r in runs), 2),
        f"emulator_cpu_ratio{suffix}": rounded(median(
            [run.emulator_cpu_s / cpu for run, cpu in zip(runs, bare_emulator_cpu,
                                                         strict=True)])),
        f"state_kib_per_capability{suffix}": rounded(per_capability(r.state_bytes / 1024
                                                                    for r in runs), 1),
        f"resync_writes{suffix}": max(writes(r.resync) for r in runs),
        f"resync_calls{suffix}": max(sum(r.resync.values()) for r in runs),
        f"operator_s{suffix}": rounded(median([run.seconds for run in runs])),
        f"bare_s{suffix}": rounded(median(bare)),
        f"floor_s{suffix}": rounded(median(floor)),
    }


def run() -> dict[str, Any]:
    """Apply N Capabilities (each N in SIZES) with the operator running, in alternating pairs
    with a bare client writing the same children; return the figures."""
    figures: dict[str, Any] = {"sizes": list(SIZES), "concurrency": CONCURRENCY,
                               "load_1m_start": rounded(os.getloadavg()[0], 1)}
    # As `packetflow operator` starts (cli.py); the bare client shares the process, and so
    # the collector's settings.
    settle_heap()
    for count in SIZES:
        figures.update(_size_figures(count))
    figures["load_1m_end"] = rounded(os.getloadavg()[0], 1)
    return figures


if __name__ == "__main__":
    if sys.argv[1:2] == ["--kubectl"]:
        asyncio.run(_kubectl_main(sys.argv[2], int(sys.argv[3])))
    else:
        print(run())
