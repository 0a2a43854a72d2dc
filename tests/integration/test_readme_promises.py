"""README promises about processes, each checked on a real one: `packetflow runtime` strictness
and JSON logs, the settings the operator gives runtime pods, `call --wait/--timeout`, and W3C
`traceparent` over gRPC."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import httpx
import orjson
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from packetflow.client import CallError, RuntimeClient
from packetflow.manifests import parse_manifest
from packetflow.operator import render
from packetflow.operator.settings import OperatorSettings
from packetflow.rpc import SERVICE_NAME
from packetflow.server import RuntimeServer
from packetflow.spec import Capability
from packetflow.v1 import runtime_pb2, runtime_pb2_grpc
from tests.conftest import eventually
from tests.support.processes import ROOT, RuntimeProcess, free_port, packetflow

NAP = """
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: nap}
spec:
  intent: Sleep a while
  requires: {seconds: {type: number}}
  implementation: {python: {module: tests.support.handlers, function: nap}}
  timeoutSeconds: 600
"""
# On Kubernetes each pod serves one Capability: a step naming another one calls its Service,
# but a completion trigger cannot see calls made in another process.
WATCHER = """
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: watcher}
spec:
  intent: Run after fetch fails
  implementation:
    composition:
      steps: [{call: {capability: fetch}}]
      triggers: [{completed: {capability: fetch, outcome: failure}}]
"""
MCP_TOKEN = "pod-token-42"
SECRETS = {("mcp", "token"): MCP_TOKEN}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------ strictness

def test_runtime_refuses_a_bad_bundle_naming_file_and_field(tmp_path: Path) -> None:
    bundle = write(tmp_path, "bad.yaml", NAP.replace("type: number", "type: numbr"))
    result = packetflow("runtime", "--bundle", str(bundle), "--address", "127.0.0.1:0",
                        "--metrics-address", "", "--state-dir", str(tmp_path / "state"),
                        timeout=60)
    assert result.returncode == 1, result.stderr
    assert "bad.yaml" in result.stderr and "spec.requires.seconds" in result.stderr
    assert "packetflow: serving" not in result.stderr


def test_on_kubernetes_a_completed_trigger_on_another_capability_refuses_to_start(
        tmp_path: Path) -> None:
    bundle = write(tmp_path, "bundle.yaml", WATCHER)
    result = packetflow("runtime", "--bundle", str(bundle), "--address", "127.0.0.1:0",
                        "--metrics-address", "", "--state-dir", str(tmp_path / "state"),
                        env={"PACKETFLOW_UNDECLARED_AS_SERVICES": "true"}, timeout=60)
    assert result.returncode == 1, result.stderr
    # The step naming `fetch` is fine there (its Service); the trigger is what refuses.
    assert "spec.implementation.composition.triggers[0].completed.capability" in result.stderr
    assert "steps[0]" not in result.stderr
    assert "packetflow: serving" not in result.stderr


# --------------------------------------------------------------- as the operator runs pods

def pod_environment(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet would fill it (Secrets from ``SECRETS``)."""
    env = {}
    for variable in container["env"]:
        if "value" in variable:
            env[variable["name"]] = variable["value"]
            continue
        source = variable["valueFrom"]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[variable["name"]] = SECRETS[(ref["name"], ref["key"])]
        else:
            assert source == {"fieldRef": {"fieldPath": "metadata.namespace"}}, source
            env[variable["name"]] = "default"
    return env


async def test_runtime_honours_drain_grace_and_mcp_token_as_the_operator_sets_them(
        tmp_path: Path, processes: list[RuntimeProcess]) -> None:
    # The operator's default drain (5 s), a short grace, MCP with a token from a Secret.
    settings = OperatorSettings(grace_seconds=1, mcp_enabled=True, mcp_token_secret="mcp/token")
    capability = parse_manifest(yaml.safe_load(NAP))
    assert isinstance(capability, Capability)
    (container,) = render.render_deployment(capability, "default", settings)[
        "spec"]["template"]["spec"]["containers"]
    bundle = write(tmp_path, "bundle.yaml", render.render_configmap(
        capability, "default", settings)["data"]["bundle.yaml"])
    env = pod_environment(container)
    assert (env["PACKETFLOW_DRAIN_SECONDS"], env["PACKETFLOW_GRACE_SECONDS"]) == ("5", "1")
    assert env["PACKETFLOW_MCP_TOKEN"] == MCP_TOKEN
    # The pod's own flags, on loopback ports here.
    address, metrics, mcp = (f"127.0.0.1:{free_port()}" for _ in range(3))
    flags = dict(zip(container["args"][1::2], container["args"][2::2], strict=True))
    assert sorted(flags) == ["--address", "--bundle", "--mcp-address", "--metrics-address"]
    local = {"--bundle": str(bundle), "--address": address, "--metrics-address": metrics,
             "--mcp-address": mcp}
    runtime = RuntimeProcess(bundle, tmp_path / "state", tmp_path / "runtime.log",
                             {**env, "PACKETFLOW_LOG_LEVEL": "INFO"}, address=address,
                             args=[part for flag in flags for part in (flag, local[flag])])
    processes.append(runtime)

    async with httpx.AsyncClient(timeout=30) as http:
        url = f"http://{mcp}/mcp"
        initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {},
            "clientInfo": {"name": "tests", "version": "1"}}}
        headers = {"Accept": "application/json, text/event-stream"}
        refused = await http.post(url, json=initialize, headers=headers)
        assert refused.status_code == 401
        accepted = await http.post(url, json=initialize, headers={
            **headers, "Authorization": f"Bearer {MCP_TOKEN}"})
        assert accepted.status_code == 200 and "serverInfo" in accepted.text

    async with RuntimeClient(address) as client, grpc.aio.insecure_channel(address) as channel:
        long = asyncio.create_task(client.invoke("nap", {"seconds": 300}, timeout=250))
        await eventually(lambda: _in_flight(metrics, "nap") == 1, timeout=30,
                         what="the long call in flight")
        runtime.process.send_signal(signal.SIGTERM)
        health = health_pb2_grpc.HealthStub(channel)

        async def not_serving() -> bool:
            reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
            return reply.status == health_pb2.HealthCheckResponse.NOT_SERVING

        # Draining: NOT_SERVING, yet calls are still served (without the drain the server
        # would refuse these checks at once).
        await eventually(not_serving, what="NOT_SERVING while draining")
        assert await client.invoke("nap", {"seconds": 0}) == {"slept": 0}
        # Then a grace of 1 s, not the default 30: the 300 s call is cut and the process exits.
        code = await asyncio.to_thread(runtime.process.wait, 20)
        assert code == 0
        try:
            await long
        except CallError as exc:
            assert exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), exc
        else:
            raise AssertionError("the 300 s call finished")

    # JSON logs (the runtime's default format): every log line is one JSON event (beside the
    # "packetflow: ..." announcements for people); the drain event carries the pod's settings.
    lines = [line for line in runtime.log.read_text().splitlines()
             if not line.startswith("packetflow: ")]
    events = [orjson.loads(line) for line in lines]
    assert all({"time", "level", "logger", "event"} <= set(event) for event in events)
    (draining,) = [event for event in events if event["event"] == "draining"]
    assert (draining["drain_seconds"], draining["grace_seconds"]) == (5, 1)


def _in_flight(metrics: str, capability: str) -> float:
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as response:
        text = response.read().decode()
    needle = f'packetflow_capability_in_flight{{capability="{capability}"}} '
    for line in text.splitlines():
        if line.startswith(needle):
            return float(line.removeprefix(needle))
    return 0.0


# ------------------------------------------------------------------------ call --wait/--timeout

def test_call_wait_and_timeout(tmp_path: Path, processes: list[RuntimeProcess]) -> None:
    def call(address: str, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "packetflow.cli", "call", "nap", "--address", address,
             *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    nobody, address = (f"127.0.0.1:{free_port()}" for _ in range(2))
    instant = ("--data", '{"seconds": 0}')
    # A call waiting for a runtime that is still starting gets through once it serves.
    started = {"waiting": call(address, *instant, "--wait", "--timeout", "60")}
    try:
        processes.append(RuntimeProcess(write(tmp_path, "nap.yaml", NAP), tmp_path / "state",
                                        tmp_path / "runtime.log", address=address))
        # The other calls run side by side (each CLI process takes seconds to start on a busy
        # machine). With nobody listening: --wait waits until --timeout; without it the call
        # fails at once. --timeout is the call's deadline: the handler is cut there.
        started["waited"] = call(nobody, *instant, "--wait", "--timeout", "3")
        started["failed"] = call(nobody, *instant, "--timeout", "60")
        started["slow"] = call(address, "--data", '{"seconds": 120}', "--timeout", "1")
        results = {name: (p.communicate(timeout=90), p.returncode)
                   for name, p in started.items()}
    finally:
        for process in started.values():
            if process.poll() is None:
                process.kill()
            process.communicate()  # reaps it and closes its pipes
    (out, err), code = results["waiting"]
    assert code == 0 and orjson.loads(out) == {"slept": 0}, err
    (_, waited), code = results["waited"]
    assert code == 1 and waited.startswith("error: DEADLINE_EXCEEDED"), waited
    (_, failed), code = results["failed"]
    assert code == 1 and failed.startswith("error: UNAVAILABLE"), failed
    (_, slow), code = results["slow"]
    assert code == 1 and slow.startswith("error: DEADLINE_EXCEEDED"), slow


# ----------------------------------------------------------------------------- traceparent

async def test_w3c_traceparent_carries_the_trace_id(runtime: RuntimeServer) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.port}") as channel:
        stub = runtime_pb2_grpc.CapabilityRuntimeStub(channel)
        request = runtime_pb2.InvokeRequest(capability="whoami", input_json=b"{}")
        reply = await stub.Invoke(request, metadata=(
            ("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"),))
        assert orjson.loads(reply.output_json)["trace_id"] == trace_id
        assert reply.trace_id == trace_id
        # packetflow-trace-id, when also sent, is the one used.
        both = await stub.Invoke(request, metadata=(
            ("packetflow-trace-id", "ours"),
            ("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01")))
        assert orjson.loads(both.output_json)["trace_id"] == "ours"
        # A malformed header is ignored: a fresh trace id, not a fragment of it.
        odd = await stub.Invoke(request, metadata=(("traceparent", "garbage"),))
        assert len(orjson.loads(odd.output_json)["trace_id"]) == 32
