"""The routing controller against real parts: a real Prometheus scraping a real
``packetflow dev`` runtime under generated load, and ``packetflow controller --target`` as a
subprocess printing what it would do. Short windows (1 s scrapes and ticks, 12 s of history,
a 3 s scaleDownDelay) keep it well under a minute."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from packetflow.cli import main
from packetflow.client import RuntimeClient
from packetflow.operator.routing.loop import read_approvals
from tests.conftest import eventually
from tests.integration.test_cli import ROOT, DevServer, free_port
from tests.support.prometheus import PrometheusServer

HANDLER = """
import asyncio


async def pause(ms: int = 50) -> dict:
    await asyncio.sleep(ms / 1000)
    return {"ok": True}
"""

MANIFEST = """
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: slow}
spec:
  intent: Take 50 ms
  requires: {ms: {type: integer, default: 50}}
  implementation: {python: {module: slowcalls, function: pause}}
  slo: {latencyP99Ms: 1000}
  scaling: {minReplicas: 1, maxReplicas: 10, targetConcurrency: 1, scaleDownDelay: 3s}
"""


class Controller:
    """``packetflow controller --target DIR`` with its stdout in a file."""

    def __init__(self, directory: Path, prometheus_url: str, out: Path,
                 state_dir: Path) -> None:
        self.out = out
        env = dict(os.environ, PACKETFLOW_HISTORY_SECONDS="12",
                   PACKETFLOW_POD_STARTUP_SECONDS="2")
        self.log = out.with_suffix(".log")  # its reasoning, for a failure's post-mortem
        with out.open("w") as sink, self.log.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "packetflow.cli", "controller", "--target",
                 str(directory), "--prometheus-url", prometheus_url, "--interval", "1",
                 "--scrape-interval", "1", "--state-dir", str(state_dir)],
                stdout=sink, stderr=log, env=env, cwd=ROOT)

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.read_text().splitlines() if line]

    def replicas(self) -> list[int]:
        """Every replica count it decided, in order."""
        return [line["replicas"]["to"] for line in self.lines() if line["replicas"]]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=30) == 0


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[tuple[DevServer, Path]]:
    directory = tmp_path / "manifests"
    directory.mkdir()
    (directory / "slowcalls.py").write_text(HANDLER)
    (directory / "slow.yaml").write_text(MANIFEST)
    server = DevServer(directory, tmp_path / "dev.log")
    try:
        yield server, directory
    finally:
        server.stop()


async def load(address: str, seconds: float, per_second: float) -> None:
    """Calls at a steady rate (not waiting for each other), for ``seconds``."""
    async with RuntimeClient(address) as client:
        calls: set[asyncio.Task[Any]] = set()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            task = asyncio.ensure_future(client.invoke("slow", {}, timeout=10))
            calls.add(task)
            task.add_done_callback(calls.discard)
            await asyncio.sleep(1 / per_second)
        await asyncio.gather(*calls)


async def test_scales_up_on_a_step_and_back_down_after_the_delay(
        runtime: tuple[DevServer, Path], tmp_path: Path) -> None:
    dev, directory = runtime
    prometheus = PrometheusServer.start([dev.metrics])
    controller = Controller(directory, prometheus.url, tmp_path / "decisions.jsonl",
                            tmp_path / "state")
    try:
        # Idle first: the controller sees the capability's metrics and holds minReplicas.
        await eventually(lambda: any(c["type"] == "MetricsAvailable" and c["status"]
                                     for line in controller.lines()
                                     for c in line["conditions"]),
                         timeout=60, what="the controller to read the runtime's metrics")
        assert controller.replicas() == []
        # A step: 40 calls/s of 50 ms at one call per replica needs at least 2 replicas.
        await load(dev.address, 8, 40)
        assert max(controller.replicas(), default=1) >= 2, controller.lines()
        # Idle again: back to minReplicas, once the delay and the short history allow.
        await eventually(lambda: controller.replicas()[-1:] == [1], timeout=60,
                         what="a scale-down to minReplicas")
        decided = controller.replicas()
        peak = decided.index(max(decided))
        assert decided[peak:] == sorted(decided[peak:], reverse=True)  # down, never flapping
        reasons = [r for line in controller.lines() for r in line["reasons"]]
        assert any("needs" in r for r in reasons) and any("needed at most" in r for r in reasons)
    finally:
        controller.stop()
        prometheus.stop()


async def test_prometheus_down_keeps_replicas_and_says_why(
        runtime: tuple[DevServer, Path], tmp_path: Path) -> None:
    _, directory = runtime
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    controller = Controller(directory, closed, tmp_path / "decisions.jsonl",
                            tmp_path / "state")
    try:
        await eventually(lambda: len(controller.lines()) >= 1, timeout=30,
                         what="a first decision")
        line = controller.lines()[0]
        metrics = next(c for c in line["conditions"] if c["type"] == "MetricsAvailable")
        assert metrics["status"] is False and metrics["reason"] == "PrometheusUnavailable"
        assert "did not answer" in metrics["message"]
        scaling = next(c for c in line["conditions"] if c["type"] == "ScalingActive")
        assert scaling["status"] is False
        assert controller.replicas() == []
    finally:
        controller.stop()


def test_approve_locally_writes_what_the_target_controller_reads(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["approve", "slow", "cache-3", "--state-dir", str(tmp_path)]) == 0
    assert main(["approve", "slow", "concurrency-4", "--reject",
                 "--state-dir", str(tmp_path)]) == 0
    assert read_approvals(tmp_path) == {"slow": {"approve": "cache-3",
                                                 "reject": "concurrency-4"}}
    assert main(["controller", "--target", str(tmp_path / "nope"), "--once"]) == 2
    assert "no such file or directory" in capsys.readouterr().err
