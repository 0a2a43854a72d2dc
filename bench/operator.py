"""Operator throughput: 500 Capabilities created against the Kubernetes emulator.

The real kopf operator (in its own thread and event loop, as in the tests) watches the
emulator (kmock over HTTP, with the test fixture that fills kmock's gaps); this process plays
kubectl and creates the Capabilities, 50 requests at a time. Figures:

- ``seconds_until_all_deployments``: from the first create until every Deployment exists;
- ``seconds_until_all_status``: until every Capability has a status for its generation;
- ``reconciles_per_second``: Capability reconciles (create handler runs) over that time;
- ``handler_p50_ms``/``handler_p99_ms``: latency of the Capability handler;
  ``child_event_p50_ms``/``child_event_p99_ms``: of the children's event handler;
- ``baseline_seconds``: a bare client creating the same 1,500 child objects (no kopf, no
  operator) against a fresh emulator with the same concurrency; ``overhead_ratio`` is the
  operator's time to all Deployments over that: what watching, rendering, ownership checks
  and status writes cost beyond the writes themselves (DESIGN.md, performance method).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import CollectorRegistry

from bench.common import percentile, rounded
from packetflow.operator import render
from packetflow.operator.handlers import OperatorContext, OperatorThread
from packetflow.operator.metrics import OperatorMetrics
from packetflow.operator.settings import OperatorSettings
from packetflow.spec import Capability

# The emulator with kmock's gaps filled lives with the tests that need it (DESIGN.md).
from tests.operator.kube_emulator import CAPABILITIES, running_emulator, write_kubeconfig

COUNT = int(os.environ.get("PACKETFLOW_BENCH_CAPABILITIES", "500"))
CONCURRENCY = 50
NAMESPACE = "default"
CAPS_PATH = f"/apis/packetflow.io/v1alpha1/namespaces/{NAMESPACE}/capabilities"
TIMEOUT = 300.0


def _manifest(index: int) -> dict[str, Any]:
    return {"apiVersion": "packetflow.io/v1alpha1", "kind": "Capability",
            "metadata": {"name": f"cap-{index:04d}", "namespace": NAMESPACE},
            "spec": {"intent": f"Echo number {index}", "requires": {"message": {"type": "string"}},
                     "implementation": {"builtin": {"name": "echo"}}, "replicas": 1}}


async def _post_all(base_url: str, items: Iterable[tuple[str, dict[str, Any]]]) -> None:
    semaphore = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
        async def post(path: str, body: dict[str, Any]) -> None:
            async with semaphore:
                response = await client.post(path, json=body)
                response.raise_for_status()
        await asyncio.gather(*(post(path, body) for path, body in items))


async def _until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {TIMEOUT}s waiting for {what}")
        await asyncio.sleep(0.05)


async def _timed(action: Awaitable[None]) -> float:
    start = time.perf_counter()
    await action
    return time.perf_counter() - start


async def _baseline() -> float:
    """Seconds for a bare client to create the same children (rendered beforehand)."""
    settings = OperatorSettings()
    items: list[tuple[str, dict[str, Any]]] = []
    for index in range(COUNT):
        cap = Capability.model_validate(_manifest(index))
        for child in render.desired_children(cap, NAMESPACE, settings):
            plural = {"ConfigMap": "configmaps", "Service": "services",
                      "Deployment": "deployments"}[child["kind"]]
            root = "/api/v1" if child["apiVersion"] == "v1" else "/apis/apps/v1"
            items.append((f"{root}/namespaces/{NAMESPACE}/{plural}", child))
    async with running_emulator() as (_, url):
        return await _timed(_post_all(url, items))


async def _operator_run() -> dict[str, Any]:
    async with running_emulator() as (cluster, url):
        kubeconfig = write_kubeconfig(Path(tempfile.mkdtemp()) / "kubeconfig", url)
        previous = os.environ.get("KUBECONFIG")
        os.environ["KUBECONFIG"] = str(kubeconfig)
        metrics = OperatorMetrics(registry=CollectorRegistry(), keep_durations=True)
        settings = OperatorSettings(liveness_address=None, operator_metrics_address=None)
        thread = OperatorThread(OperatorContext.create(settings, metrics),
                                namespaces=[NAMESPACE])
        await asyncio.to_thread(thread.start)
        try:
            start = time.perf_counter()
            creating = asyncio.create_task(
                _post_all(url, ((CAPS_PATH, _manifest(i)) for i in range(COUNT))))
            await _until(lambda: len(cluster.names("apps/v1/deployments", NAMESPACE)) >= COUNT,
                         "every Deployment")
            deployments_s = time.perf_counter() - start
            await creating

            def all_status() -> bool:
                return all((cluster.live(CAPABILITIES, NAMESPACE, f"cap-{i:04d}") or {})
                           .get("status", {}).get("observedGeneration") == 1
                           for i in range(COUNT))
            await _until(all_status, "every status")
            status_s = time.perf_counter() - start
        finally:
            await asyncio.to_thread(thread.stop)
            if previous is None:
                os.environ.pop("KUBECONFIG", None)
            else:
                os.environ["KUBECONFIG"] = previous
    handler = metrics.durations.get("create", [])
    children = metrics.durations.get("child-changed", [])
    return {
        "seconds_until_all_deployments": rounded(deployments_s),
        "seconds_until_all_status": rounded(status_s),
        "reconciles": len(handler),
        "reconciles_per_second": rounded(len(handler) / status_s, 1),
        "handler_p50_ms": rounded(percentile(handler, 0.5) * 1000, 1),
        "handler_p99_ms": rounded(percentile(handler, 0.99) * 1000, 1),
        "child_events": len(children),
        "child_event_p50_ms": rounded(percentile(children, 0.5) * 1000, 2),
        "child_event_p99_ms": rounded(percentile(children, 0.99) * 1000, 2),
    }


def run() -> dict[str, Any]:
    """Create 500 Capabilities with the real operator running; return the figures."""
    figures: dict[str, Any] = {"capabilities": COUNT, "concurrency": CONCURRENCY}
    figures.update(asyncio.run(_operator_run()))
    baseline = asyncio.run(_baseline())
    figures["baseline_seconds"] = rounded(baseline)
    figures["overhead_ratio"] = rounded(figures["seconds_until_all_deployments"] / baseline, 2)
    return figures


if __name__ == "__main__":
    print(run())
