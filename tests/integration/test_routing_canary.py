"""Canary judgement end to end: a real gateway splits calls between a stable and a failing
canary runtime, a real Prometheus scrapes the gateway, and ``packetflow controller --target``
rolls the canary back from the gateway's per-version attempt metrics."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from packetflow.client import RuntimeClient
from tests.conftest import eventually
from tests.integration.test_routing_controller import Controller
from tests.support.processes import RuntimeProcess, free_port, gateway_process
from tests.support.prometheus import PrometheusServer

BUNDLE = """
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: flaky}
spec:
  intent: Fail where the backend is told to
  requires: {message: {type: string}}
  implementation: {python: {module: tests.support.gateway_handlers, function: unavailable}}
  effects: []
"""
# What the controller reads (target mode): the same Capability with its canary and SLO.
MANAGED = BUNDLE + """  slo: {availability: 99}
  canary: {weight: 50, promote: manual}
"""


@pytest.mark.timeout(300)  # five processes and Prometheus on a loaded 2-core machine
async def test_a_failing_canary_is_rolled_back_from_the_gateways_metrics(
        tmp_path: Path) -> None:
    (tmp_path / "bundle").mkdir()
    bundle = tmp_path / "bundle" / "flaky.yaml"
    bundle.write_text(BUNDLE)
    scraped = {name: f"127.0.0.1:{free_port()}" for name in ("stable", "canary", "gateway")}
    stable = RuntimeProcess(bundle, tmp_path / "stable", tmp_path / "stable.log",
                            {"PF_GW_NAME": "stable"},
                            args=["--metrics-address", scraped["stable"]])
    canary = RuntimeProcess(bundle, tmp_path / "canary", tmp_path / "canary.log",
                            {"PF_GW_NAME": "canary", "PF_GW_FAIL": "1"},
                            args=["--metrics-address", scraped["canary"]])
    routes = tmp_path / "routes.yaml"
    # No outlier ejection: the canary keeps getting its share, so the judgement has data
    # (ejection would protect callers too, but only the rollback lasts). Half the calls fail
    # once, so the retry budget allows every call one retry (the default 20% would run out
    # and the caller would see the canary's errors).
    routes.write_text(f"capabilities:\n  flaky:\n    backends: ['{stable.address}']\n"
                      f"    canary: {{backends: ['{canary.address}'], weight: 50}}\n"
                      "    traffic: {outlierDetection: {consecutiveFailures: 1000000},\n"
                      "              retries: {budgetPercent: 100}}\n")
    port = free_port()
    gateway = gateway_process(routes, tmp_path / "gateway.log", port, scraped["gateway"])
    (tmp_path / "managed").mkdir()
    (tmp_path / "managed" / "flaky.yaml").write_text(MANAGED)
    prometheus = PrometheusServer.start(list(scraped.values()))
    controller = Controller(tmp_path / "managed", prometheus.url,
                            tmp_path / "decisions.jsonl", tmp_path / "state")
    try:
        async with RuntimeClient(f"127.0.0.1:{port}") as client:
            answered: list[str] = []

            async def traffic() -> None:
                while True:  # until the rollback is seen (cancelled)
                    # The gateway retries the canary's UNAVAILABLE on stable: callers see OK.
                    reply = await client.invoke("flaky", {"message": "x"}, timeout=10,
                                                wait_for_ready=True)
                    answered.append(reply["backend"])
                    await asyncio.sleep(0.02)

            load = asyncio.ensure_future(traffic())
            try:
                def rolled_back() -> bool:
                    if load.done():  # a caller saw an error: surface it, do not wait it out
                        load.result()
                    return any(line["weight"] == 0 for line in controller.lines())

                await eventually(rolled_back, timeout=150,
                                 what=f"the canary's rollback ({controller.log})")
            finally:
                load.cancel()
        assert set(answered) == {"stable"}  # every answer came from stable
        rollback = next(line for line in controller.lines() if line["weight"] == 0)
        assert any("canary misses the SLO (errors 100.00%" in reason
                   for reason in rollback["reasons"]), rollback
    finally:
        controller.stop()
        prometheus.stop()
        gateway.terminate()
        gateway.wait(30)
        stable.stop()
        canary.stop()
