"""Compositions whose steps run on a second real runtime server, called over real gRPC."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from packetflow.actors import ActorSystem
from packetflow.client import CallError, RuntimeClient
from packetflow.composition.executor import trace_of
from packetflow.composition.remote import RemoteCaller
from packetflow.composition.resolve import ServiceResolver
from packetflow.context import CallContext
from packetflow.engine import Engine
from packetflow.errors import Unavailable
from packetflow.manifests import load_text
from packetflow.server import RuntimeServer
from tests.conftest import eventually
from tests.support import handlers
from tests.support.actors import handler_actor
from tests.support.dns import dns_server


def front_manifests(remote: str, dead: str) -> str:
    """Compositions served by the front runtime; their steps call the ``remote`` runtime."""
    return f"""
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {{name: remote-pipeline}}
spec:
  intent: Add remotely, then echo the sum remotely, then report who the remote saw
  requires: {{a: {{type: integer}}}}
  implementation:
    composition:
      steps:
        - {{name: added, call: {{capability: add, address: "{remote}",
                                 input: {{a: input.a, b: "`1`"}}}}}}
        - {{name: echoed, call: {{capability: echo, address: "{remote}",
                                  input: {{message: "to_string(steps.added.sum)"}}}}}}
        - {{name: who, call: {{capability: whoami, address: "{remote}", input: {{}}}}}}
      output: "{{sum: steps.added.sum, message: steps.echoed.message, seen: steps.who}}"
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {{name: remote-fanout}}
spec:
  intent: Add one to every number on the remote runtime and sum the results
  requires: {{numbers: {{type: array}}}}
  provides: {{sum: {{type: integer}}}}
  implementation:
    composition:
      steps:
        - mapReduce:
            over: input.numbers
            concurrency: 4
            map: {{call: {{capability: add, address: "{remote}", input: {{a: item, b: "`1`"}}}}}}
            reduce: sum
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {{name: remote-hold}}
spec:
  intent: Wait on the remote runtime
  requires: [gate]
  implementation:
    composition:
      steps: [{{call: {{capability: hold, address: "{remote}"}}}}]
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {{name: remote-dead}}
spec:
  intent: Call a runtime that is not there, with retries
  implementation:
    composition:
      steps:
        - {{name: gone, call: {{capability: echo, address: "{dead}"}},
            retry: {{maxAttempts: 3, backoffSeconds: 0.01}}}}
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {{name: remote-bad-input}}
spec:
  intent: Send the remote add a string
  implementation:
    composition:
      steps: [{{name: adding, call: {{capability: add, address: "{remote}",
                                       input: {{a: "'one'"}}}}}}]
"""


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Front:
    """The front runtime: compositions with a RemoteCaller, served over real gRPC."""

    def __init__(self, engine: Engine, server: RuntimeServer, remote: RemoteCaller) -> None:
        self.engine = engine
        self.server = server
        self.remote = remote


@pytest.fixture
async def front(runtime: RuntimeServer) -> AsyncIterator[Front]:
    loaded = load_text(front_manifests(f"127.0.0.1:{runtime.port}", f"127.0.0.1:{free_port()}"))
    assert not loaded.errors, loaded.errors
    remote = RemoteCaller()
    engine = Engine(loaded.capabilities, remote=remote)
    assert engine.load_errors == []
    server = await RuntimeServer.start(engine, "127.0.0.1:0")
    try:
        yield Front(engine, server, remote)
    finally:
        await server.stop(grace=0)
        await engine.aclose()


@pytest.fixture
async def front_client(front: Front) -> AsyncIterator[RuntimeClient]:
    async with RuntimeClient(f"127.0.0.1:{front.server.port}", caller="alice") as c:
        yield c


async def test_pipeline_runs_on_the_remote_runtime_and_propagates_context(
        front: Front, front_client: RuntimeClient) -> None:
    out = await front_client.invoke("remote-pipeline", {"a": 41}, timeout=10,
                                    trace_id="trace-remote")
    assert out["sum"] == 42 and out["message"] == "42"
    # Caller identity, trace id and a deadline crossed both hops.
    assert out["seen"] == {"caller": "alice", "trace_id": "trace-remote",
                           "has_deadline": True, "effects": ["network"]}
    await front_client.invoke("remote-pipeline", {"a": 1}, timeout=10)
    assert len(front.remote.clients) == 1  # one channel per address, reused


async def test_map_reduce_fans_out_to_the_remote_runtime(front_client: RuntimeClient) -> None:
    out = await front_client.invoke("remote-fanout", {"numbers": list(range(30))}, timeout=10)
    assert out == {"sum": sum(range(30)) + 30}


async def test_trace_records_remote_steps(front: Front) -> None:
    ctx = CallContext(capability="remote-pipeline", trace_id="t", caller="bob")
    await front.engine.invoke("remote-pipeline", {"a": 1}, ctx)
    trace = trace_of(ctx)
    assert trace is not None
    (address,) = front.remote.clients
    assert [(s["name"], s["address"], s["inputFields"], s["outcome"])
            for s in trace["steps"]] == [("added", address, ["a", "b"], "OK"),
                                         ("echoed", address, ["message"], "OK"),
                                         ("who", address, [], "OK")]


async def test_callers_deadline_cancels_the_remote_step(front_client: RuntimeClient) -> None:
    gate = f"gate-{uuid.uuid4().hex}"
    handlers.GATES[gate] = asyncio.Event()
    trace_id = uuid.uuid4().hex
    try:
        with pytest.raises(CallError) as caught:
            await front_client.invoke("remote-hold", {"gate": gate}, timeout=0.5,
                                      trace_id=trace_id)
        assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        await eventually(lambda: trace_id in handlers.CANCELLED,
                         what="the remote handler to be cancelled")
    finally:
        handlers.GATES.pop(gate, None)


async def test_client_cancellation_reaches_the_remote_step(front_client: RuntimeClient) -> None:
    gate = f"gate-{uuid.uuid4().hex}"
    handlers.GATES[gate] = asyncio.Event()
    trace_id = uuid.uuid4().hex
    try:
        call = asyncio.create_task(front_client.invoke("remote-hold", {"gate": gate},
                                                       timeout=30, trace_id=trace_id))
        await eventually(lambda: trace_id in handlers.STARTED, what="the remote step to start")
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await eventually(lambda: trace_id in handlers.CANCELLED,
                         what="the remote handler to be cancelled")
    finally:
        handlers.GATES.pop(gate, None)


async def test_unreachable_runtime_is_retried_then_unavailable(front: Front) -> None:
    ctx = CallContext(capability="remote-dead", trace_id="t")
    with pytest.raises(Unavailable, match="step 'gone'"):
        await front.engine.invoke("remote-dead", {}, ctx)
    trace = trace_of(ctx)
    assert trace is not None and trace["steps"][0]["attempts"] == 3


async def test_remote_invalid_argument_keeps_code_and_names_the_step(
        front_client: RuntimeClient) -> None:
    with pytest.raises(CallError) as caught:
        await front_client.invoke("remote-bad-input", {}, timeout=10)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in caught.value.violations] == ["steps.adding.input.a"]
    assert "step 'adding'" in caught.value.message


async def test_step_addressed_by_service_name_reaches_the_srv_port(
        runtime: RuntimeServer) -> None:
    # Kubernetes DNS publishes _grpc._tcp.<service> for the Service's port named grpc.
    records = {"_grpc._tcp.adder.team.svc.cluster.local": ("localhost", runtime.port)}
    with dns_server(records) as (dns, dns_port):
        resolver = ServiceResolver("default", "cluster.local",
                                   nameservers=[("127.0.0.1", dns_port)])
        loaded = load_text("""
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: via-service}
spec:
  intent: Add on the runtime behind the adder Service of namespace team
  implementation:
    composition:
      steps: [{call: {capability: add, address: adder.team, input: {a: input.a, b: "`2`"}}}]
""")
        engine = Engine(loaded.capabilities, remote=RemoteCaller(resolver=resolver))
        try:
            for a in (1, 5):
                ctx = CallContext(capability="via-service", trace_id=uuid.uuid4().hex)
                assert await engine.invoke("via-service", {"a": a}, ctx) == {"sum": a + 2}
        finally:
            await engine.aclose()
    assert dns.queries == ["_grpc._tcp.adder.team.svc.cluster.local."]  # cached after one


async def test_service_without_srv_record_gets_the_default_runtime_port() -> None:
    with dns_server({}) as (_, dns_port):
        resolver = ServiceResolver("shop", "cluster.local", nameservers=[("127.0.0.1", dns_port)])
        assert await resolver.resolve("cart") == "cart.shop.svc.cluster.local:50051"
        assert await resolver.resolve("cart.other") == "cart.other.svc.cluster.local:50051"
        assert await resolver.resolve("10.0.0.7:9000") == "10.0.0.7:9000"


PIPELINE_OVER_SERVICES = """
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: add-then-echo}
spec:
  intent: Add, then echo the sum, each capability in its own pods
  requires: {a: {type: integer}}
  implementation:
    composition:
      steps:
        - {name: added, call: {capability: add, input: {a: input.a, b: "`1`"}}}
        - {call: {capability: echo, input: {message: "to_string(steps.added.sum)"}}}
"""


async def test_on_kubernetes_undeclared_capabilities_are_their_services(
        runtime: RuntimeServer) -> None:
    # As the operator renders it: the bundle holds only the composition.
    loaded = load_text(PIPELINE_OVER_SERVICES)
    assert Engine(loaded.capabilities).load_errors  # locally, `add` is simply not declared
    records = {f"_grpc._tcp.{name}.shop.svc.cluster.local": ("localhost", runtime.port)
               for name in ("add", "echo")}
    with dns_server(records) as (dns, dns_port):
        resolver = ServiceResolver("shop", "cluster.local",
                                   nameservers=[("127.0.0.1", dns_port)])
        engine = Engine(loaded.capabilities, remote=RemoteCaller(resolver=resolver),
                        undeclared_as_services=True)
        try:
            assert engine.load_errors == []
            ctx = CallContext(capability="add-then-echo", trace_id=uuid.uuid4().hex)
            assert await engine.invoke("add-then-echo", {"a": 41}, ctx) == {"message": "42"}
        finally:
            await engine.aclose()
    assert sorted(dns.queries) == ["_grpc._tcp.add.shop.svc.cluster.local.",
                                   "_grpc._tcp.echo.shop.svc.cluster.local."]


async def test_on_kubernetes_an_actor_calls_capabilities_at_their_services(
        runtime: RuntimeServer, tmp_path: Path) -> None:
    records = {"_grpc._tcp.echo.shop.svc.cluster.local": ("localhost", runtime.port)}
    with dns_server(records) as (_, dns_port):
        resolver = ServiceResolver("shop", "cluster.local",
                                   nameservers=[("127.0.0.1", dns_port)])
        # An actor's pod serves no capabilities: `ctx.call("echo")` goes to the echo Service.
        engine = Engine([], remote=RemoteCaller(resolver=resolver), undeclared_as_services=True)
        system = ActorSystem(engine, state_dir=tmp_path)
        try:
            assert await system.replace([handler_actor("ledger", "Ledger")]) == []
            sent = await system.get("ledger").send("a", {"n": 1, "call": "echo"})
            assert sent.reply == {"n": 1, "called": {"message": "hi"}}
        finally:
            await system.aclose()
            await engine.aclose()
