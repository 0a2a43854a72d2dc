"""The gateway in front of real ``packetflow runtime`` processes on 127.0.0.1.

Two backends serve the same bundle and behave as their environment says
(``tests.support.gateway_handlers``): ``a`` stalls ``stall...`` messages, ``b`` is slow, both
fail ``unavailable``. Each test runs its own gateway (in-process, on its own port) over its
own routes; the last ones run the real ``packetflow gateway`` process. Assertions are about
shares and outcomes, never about how long something took.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest

from packetflow.actors.timing import rendezvous_owner
from packetflow.cli import build_parser
from packetflow.client import CallError, RuntimeClient
from packetflow.context import IDEMPOTENCY_KEY
from packetflow.gateway.cli import serve_gateway
from packetflow.gateway.policy import SESSION_KEY
from packetflow.gateway.routes import parse_routes
from packetflow.gateway.server import GatewayServer
from packetflow.gateway.settings import GatewaySettings
from packetflow.v1 import runtime_pb2
from tests.conftest import eventually
from tests.support.processes import RuntimeProcess, free_port, gateway_process

CAPABILITY = """\
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {{name: {name}}}
spec:
  intent: "{intent}"
  requires: {{message: {{type: string}}}}
  provides: {{message: {{type: string}}, backend: {{type: string}}}}
  implementation: {{python: {{module: tests.support.gateway_handlers, function: {function}}}}}
  effects: {effects}
  concurrency: 1000
---
"""
LEDGER = """\
apiVersion: packetflow.io/v1alpha1
kind: Actor
metadata: {name: ledger}
spec:
  intent: Record numbers
  implementation: {python: {module: tests.support.actor_handlers, class: Ledger}}
"""
CAPABILITIES = {  # name: (function, effects)
    "whoami": ("whoami", "[]"), "slow": ("slow", "[]"), "stall": ("stall", "[]"),
    "unavailable": ("unavailable", "[]"), "record": ("record", "[state-write]"),
}


def write_bundle(directory: Path) -> Path:
    """The bundle every backend serves."""
    directory.mkdir(parents=True, exist_ok=True)
    text = "".join(CAPABILITY.format(name=name, intent=f"The {name} test capability",
                                     function=function, effects=effects)
                   for name, (function, effects) in CAPABILITIES.items())
    (directory / "bundle.yaml").write_text(text + LEDGER)
    return directory / "bundle.yaml"


def start_backends(directory: Path, envs: dict[str, dict[str, str]]) -> dict[str, RuntimeProcess]:
    """Runtime processes serving the bundle, started side by side."""
    bundle = write_bundle(directory)
    started = {name: RuntimeProcess(bundle, directory / name, directory / f"{name}.log",
                                    {"PF_GW_NAME": name, **env}, wait=False)
               for name, env in envs.items()}
    for process in started.values():
        process.wait_ready()
    return started


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RuntimeProcess]]:
    """``a`` and ``b`` for the whole module."""
    directory = tmp_path_factory.mktemp("gateway")
    started = start_backends(directory, {
        "a": {"PF_GW_STALL": "30", "PF_GW_FAIL": "1", "PF_GW_RECORD": str(directory / "a.rec"),
              "PACKETFLOW_MEMBER_ID": "m1"},
        "b": {"PF_GW_DELAY": "0.05", "PF_GW_FAIL": "1", "PF_GW_RECORD": str(directory / "b.rec"),
              "PACKETFLOW_MEMBER_ID": "m2"},
    })
    yield started
    for process in started.values():
        process.stop()


Serve = Callable[[str], Awaitable[tuple[GatewayServer, RuntimeClient]]]


@pytest.fixture
async def serve(backends: dict[str, RuntimeProcess]) -> AsyncIterator[Serve]:
    """Start gateways over routes (``@a``/``@b`` stand for the backends' addresses)."""
    running: list[tuple[GatewayServer, RuntimeClient]] = []

    async def start(routes: str) -> tuple[GatewayServer, RuntimeClient]:
        text = routes.replace("@a", backends["a"].address).replace("@b", backends["b"].address)
        server = await GatewayServer.start("127.0.0.1:0", routes=parse_routes(text, "test"))
        client = RuntimeClient(f"127.0.0.1:{server.port}")
        running.append((server, client))
        return server, client

    yield start
    for server, client in running:
        await client.close()
        # Every call's streams ended on both sides: nothing leaks, however a call ended.
        await eventually(lambda s=server: idle(s), what="every stream to close")
        await server.stop(grace=1)


def idle(server: GatewayServer) -> bool:
    """No stream open on any connection of the gateway, to callers or to backends."""
    upstream = [u.conn for u in server.table.upstreams.values() if u.conn is not None]
    return not any(conn.streams for conn in [*upstream, *server.connections])


def sample(server: GatewayServer, name: str, **labels: str) -> float:
    """A gateway metric's value (0 when absent)."""
    return server.table.metrics.registry.get_sample_value(name, labels) or 0.0


async def learned(server: GatewayServer, *names: str) -> None:
    """Until the gateway learned the capabilities' effects from a backend."""
    await eventually(lambda: all(server.table.capabilities[n].effects is not None
                                 for n in names), timeout=30, what=f"effects of {names}")


async def calls(client: RuntimeClient, name: str, count: int, concurrency: int = 8,
                message: str = "hi", **options: Any) -> list[dict[str, Any]]:
    """``count`` calls from ``concurrency`` workers; the answers."""
    answers: list[dict[str, Any]] = []

    async def worker(share: int) -> None:
        for _ in range(share):
            answers.append(await client.invoke(name, {"message": message}, timeout=30,
                                               **options))

    await asyncio.gather(*(worker(count // concurrency) for _ in range(concurrency)))
    return answers


# ---------------------------------------------------------------- speaking the runtime's API


async def test_the_gateway_answers_as_a_runtime_does(serve: Serve) -> None:
    _, client = await serve("capabilities: {whoami: ['@a', '@b'], stall: ['@a'], "
                            "empty: []}\nactors: {ledger: {members: {m1: '@a'}}}")
    answer = await client.invoke("whoami", {"message": "hi"}, timeout=10)
    assert answer["message"] == "hi" and answer["backend"] in {"a", "b"}
    # The trace id travels to the backend and back; the contract error is the backend's.
    response = await client.invoke_raw("whoami", b'{"message": "x"}', trace_id="feedbeef" * 4)
    assert response.trace_id == "feedbeef" * 4
    with pytest.raises(CallError) as bad:
        await client.invoke("whoami", {"wrong": 1}, timeout=10)
    assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {v.field for v in bad.value.violations} >= {"input.message"}
    with pytest.raises(CallError) as missing:
        await client.invoke("nope", {}, timeout=10)
    assert missing.value.code == grpc.StatusCode.NOT_FOUND and "'nope'" in missing.value.message
    assert missing.value.trace_id
    with pytest.raises(CallError) as empty:
        await client.invoke("empty", {"message": "x"}, timeout=10)
    assert empty.value.code == grpc.StatusCode.UNAVAILABLE
    assert "empty" in empty.value.message and "no ready endpoint" in empty.value.message
    with pytest.raises(CallError) as late:  # the deadline travels with the call
        await client.invoke("stall", {"message": "stall"}, timeout=0.5)
    assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    streamed = await client.invoke_stream("whoami", {"message": "s"}, timeout=10)
    assert streamed["message"] == "s"
    described = await client.describe("whoami")
    assert described["intent"] == "The whoami test capability" and described["effects"] == []
    listed = {c.name: c.intent for c in await client.list()}
    assert listed["whoami"] == "The whoami test capability" and set(listed) == \
        {"whoami", "stall", "empty"}
    reply = await client.send("ledger", "x1", {"n": 1}, timeout=10)
    assert reply == {"n": 1, "count": 1}
    assert (await client.get_actor("ledger", "x1"))["state"]["applied"] == [1]


async def test_large_messages_and_many_streams_flow(serve: Serve) -> None:
    _, client = await serve("capabilities: {whoami: ['@a', '@b']}")
    big = "x" * (3 * 1024 * 1024)  # past every HTTP/2 window: flow control both ways
    assert (await client.invoke("whoami", {"message": big}, timeout=30))["message"] == big
    answers = await calls(client, "whoami", 400, concurrency=100)
    assert len(answers) == 400


# ---------------------------------------------------------------- balancing and ejection


async def test_a_slow_backend_loses_load(serve: Serve) -> None:
    server, client = await serve("capabilities: {slow: {backends: ['@a', '@b'], "
                                 "traffic: {hedging: {enabled: false}}}}")
    answers = await calls(client, "slow", 240)
    share_b = Counter(a["backend"] for a in answers)["b"] / len(answers)
    assert share_b < 0.25  # round robin would give the slow backend half
    assert sample(server, "packetflow_gateway_requests_total", capability="slow",
                  version="stable",
                  endpoint=server.table.capabilities["slow"].stable.endpoints[1].address,
                  code="OK") == Counter(a["backend"] for a in answers)["b"]


async def test_a_killed_backend_is_ejected_and_calls_keep_succeeding(
        tmp_path: Path, serve: Serve) -> None:
    doomed = start_backends(tmp_path, {"d": {}})["d"]
    try:
        server, client = await serve(
            f"capabilities: {{whoami: {{backends: ['@a', '{doomed.address}'], traffic: "
            "{outlierDetection: {consecutiveFailures: 2, baseEjectionTime: 1h}}}}")
        before = await calls(client, "whoami", 80)
        assert {a["backend"] for a in before} == {"a", "d"}
        load = asyncio.ensure_future(calls(client, "whoami", 400, concurrency=4))
        await eventually(lambda: sample(server, "packetflow_gateway_calls_total",
                                        capability="whoami", code="OK") > 120)
        doomed.kill()
        answers = await load  # not one call failed: attempts on d were retried on a
        assert len(answers) == 400
        await eventually(lambda: sample(server, "packetflow_gateway_ejections_total",
                                        capability="whoami", endpoint=doomed.address,
                                        reason="consecutive-failures") == 1)
        after = await calls(client, "whoami", 40)
        assert {a["backend"] for a in after} == {"a"}
        assert sample(server, "packetflow_gateway_endpoints_ejected", capability="whoami") == 1
    finally:
        if doomed.process.poll() is None:
            doomed.kill()


# ---------------------------------------------------------------- retries and hedging


async def test_the_retry_budget_caps_retries_when_every_backend_fails(serve: Serve) -> None:
    server, client = await serve(
        "capabilities: {unavailable: {backends: ['@a', '@b'], traffic: {retries: "
        "{budgetPercent: 20, minPerSecond: 0}, outlierDetection: {consecutiveFailures: 100000}}}}")
    await learned(server, "unavailable")
    failures = Counter()
    for _ in range(100):
        try:
            await client.invoke("unavailable", {"message": "x"}, timeout=10)
        except CallError as exc:
            failures[exc.code] += 1
    assert failures == {grpc.StatusCode.UNAVAILABLE: 100}
    retries = sample(server, "packetflow_gateway_retries_total", capability="unavailable")
    assert 0 < retries <= 20 + 1  # a fifth of the calls (one may land as the window turns)
    assert sample(server, "packetflow_gateway_budget_exhausted_total",
                  capability="unavailable", kind="retry") >= 100 - retries - 1
    attempts = sum(sample(server, "packetflow_gateway_requests_total", capability="unavailable",
                          version="stable", endpoint=p.address, code="UNAVAILABLE")
                   for p in server.table.capabilities["unavailable"].stable.endpoints)
    assert attempts == 100 + retries


async def test_hedging_cuts_the_tail_of_a_stalling_backend(serve: Serve) -> None:
    routes = ("capabilities: {stall: {backends: ['@a', '@b'], traffic: {hedging: "
              "{enabled: %s, maxPercent: 50}}}}")
    server, client = await serve(routes % "true")
    await learned(server, "stall")
    await calls(client, "stall", 64)  # the latency estimate the hedge delay follows
    answers = await calls(client, "stall", 24, concurrency=24, message="stall")
    # Half of them went to the stalling backend first; the hedge on the other answered all.
    assert {a["backend"] for a in answers} == {"b"}
    assert sample(server, "packetflow_gateway_hedges_total", capability="stall") >= 1
    unhedged, client = await serve(routes % "false")
    await learned(unhedged, "stall")
    await calls(client, "stall", 64)
    slow = asyncio.ensure_future(calls(client, "stall", 24, concurrency=24, message="stall"))
    await eventually(lambda: sample(unhedged, "packetflow_gateway_calls_total",
                                    capability="stall", code="OK") >= 64 + 1)
    assert not slow.done()  # without hedging the calls the stalling backend got still wait
    slow.cancel()
    assert sample(unhedged, "packetflow_gateway_hedges_total", capability="stall") == 0


async def test_effects_are_never_retried_or_hedged_without_a_key(
        serve: Serve, backends: dict[str, RuntimeProcess], tmp_path: Path) -> None:
    server, client = await serve("capabilities: {record: {backends: ['@a', '@b'], "
                                 "traffic: {hedging: {maxPercent: 100}}}}")
    await learned(server, "record")
    assert server.table.capabilities["record"].effects == ("state-write",)

    def recorded() -> Counter[str]:
        lines = [line for p in backends.values()
                 for line in Path(p.log.parent / f"{p.log.stem}.rec").read_text().splitlines()
                 if line]
        return Counter(lines)

    for index in range(10):
        with pytest.raises(CallError) as failed:
            await client.invoke("record", {"message": f"fail-{tmp_path.name}-{index}"}, timeout=10)
        assert failed.value.code == grpc.StatusCode.UNAVAILABLE
    mine = {line: n for line, n in recorded().items() if tmp_path.name in line}
    assert len(mine) == 10 and set(mine.values()) == {1}  # one side effect per call
    assert sample(server, "packetflow_gateway_retries_total", capability="record") == 0
    # With an idempotency key the caller vouches for repeats: retried, the key reaching
    # the handler each time.
    request = runtime_pb2.InvokeRequest(
        capability="record", input_json=orjson.dumps({"message": f"fail-keyed-{tmp_path.name}"}))
    with pytest.raises(grpc.aio.AioRpcError) as keyed:
        await client.stub.Invoke(request, timeout=10, metadata=((IDEMPOTENCY_KEY, "k-1"),))
    assert keyed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert recorded()[f"fail-keyed-{tmp_path.name} k-1"] == 3  # maxAttempts
    # Never hedged: slow answers of the effectful capability run exactly once.
    await calls(client, "record", 64, message=f"ok-{tmp_path.name}")
    stalled = asyncio.ensure_future(
        calls(client, "record", 8, concurrency=8, message=f"stall-{tmp_path.name}"))
    await eventually(lambda: recorded()[f"stall-{tmp_path.name} -"] == 8)
    for _ in range(3):
        await client.invoke("record", {"message": f"ok-{tmp_path.name}"}, timeout=10)
    assert recorded()[f"stall-{tmp_path.name} -"] == 8
    assert sample(server, "packetflow_gateway_hedges_total", capability="record") == 0
    stalled.cancel()


# ---------------------------------------------------------------- canary weights


async def test_weights_split_calls_and_sessions_stick(serve: Serve) -> None:
    server, client = await serve(
        "capabilities: {whoami: {backends: ['@a'], canary: {backends: ['@b'], weight: 10}}}")
    answers = await calls(client, "whoami", 1600, concurrency=16)
    share = Counter(a["backend"] for a in answers)["b"] / len(answers)
    assert 0.07 <= share <= 0.13  # 10% +- 4 standard deviations of 1600 draws
    request = runtime_pb2.InvokeRequest(capability="whoami", input_json=b'{"message": "s"}')
    by_session: dict[str, set[str]] = {}
    for session in range(60):
        for _ in range(5):
            response = await client.stub.Invoke(
                request, timeout=10, metadata=((SESSION_KEY, f"user-{session}"),))
            by_session.setdefault(f"user-{session}", set()).add(
                orjson.loads(response.output_json)["backend"])
    assert all(len(seen) == 1 for seen in by_session.values())  # sticky
    assert 0 < sum(seen == {"b"} for seen in by_session.values()) < 30
    assert sample(server, "packetflow_gateway_canary_weight", capability="whoami") == 10


async def test_a_weight_change_under_load_loses_no_call(
        serve: Serve, backends: dict[str, RuntimeProcess]) -> None:
    routes = "capabilities: {whoami: {backends: ['@a'], canary: {backends: ['@b'], " \
             "weight: %d}}}"
    server, client = await serve(routes % 0)
    phases = [0, 100, 50, 0]
    phase = 0
    answered: list[tuple[int, str]] = []
    stop = asyncio.Event()

    async def worker() -> None:
        while not stop.is_set():
            started_in = phase
            answer = await client.invoke("whoami", {"message": "w"}, timeout=10)
            answered.append((started_in, answer["backend"]))

    workers = [asyncio.ensure_future(worker()) for _ in range(8)]
    for index, weight in enumerate(phases):
        if index:
            server.apply(parse_routes(
                (routes % weight).replace("@a", backends["a"].address)
                .replace("@b", backends["b"].address), "test"))
            phase = index
        # 100 calls started in this phase (answers still arriving from the last one don't count)
        await eventually(lambda i=index: sum(p == i for p, _ in answered) >= 100)
    stop.set()
    await asyncio.gather(*workers)  # a failed call would raise here
    by_phase: dict[int, Counter[str]] = {}
    for started_in, backend in answered:
        by_phase.setdefault(started_in, Counter())[backend] += 1
    # Each phase's calls went where its weight says, but for the few (at most one per worker)
    # that were on their way when the weight changed.
    assert by_phase[0]["a"] >= 100 and by_phase[0]["b"] <= 8
    assert by_phase[1]["b"] >= 100 and by_phase[1]["a"] <= 8
    assert by_phase[2]["a"] > 8 and by_phase[2]["b"] > 8
    assert by_phase[3]["a"] >= 100 and by_phase[3]["b"] <= 8


# ---------------------------------------------------------------- actors


async def test_actor_calls_go_straight_to_the_owning_member(
        serve: Serve, backends: dict[str, RuntimeProcess]) -> None:
    _, client = await serve("actors: {ledger: {members: {m1: '@a', m2: '@b'}}}")
    ids = [f"owned-{n}" for n in range(16)]
    for actor_id in ids:
        assert (await client.send("ledger", actor_id, {"n": 7}, message_id=f"{actor_id}-1",
                                  timeout=10))["n"] == 7
    # Each backend keeps its own SQLite store: an actor's state is where the gateway sent it.
    address = {"m1": backends["a"].address, "m2": backends["b"].address}
    for member in ("m1", "m2"):
        async with RuntimeClient(address[member]) as direct:
            stored = {a["id"] for a in await direct.list_actors("ledger")}
        assert {i for i in ids if rendezvous_owner(i, ["m1", "m2"]) == member} == \
            stored & set(ids)

    async def messages() -> AsyncIterator[dict[str, Any]]:
        for n in (1, 2):
            yield {"n": n}

    replies = [event.message async for event in client.converse("ledger", ids[0], messages())
               if event.kind == "reply"]
    assert [r["n"] for r in replies] == [1, 2]
    assert (await client.get_actor("ledger", ids[0]))["state"]["applied"] == [7, 1, 2]


async def test_actor_types_feedback_and_followups_pass_through(serve: Serve) -> None:
    import grpc

    from packetflow.client import CallError
    from packetflow.v1 import actors_pb2, actors_pb2_grpc

    _, client = await serve("capabilities: {whoami: ['@a']}\n"
                            "actors: {ledger: {members: {m1: '@a', m2: '@b'}}}")
    assert [(t.name, t.intent) for t in await client.list_actor_types()] == [
        ("ledger", "Record numbers")]
    described = await client.describe_actor_type("ledger")
    assert described["kind"] == "actor" and described["intent"] == "Record numbers"
    answer = await client.invoke("whoami", {"message": "x"}, timeout=30)
    assert await client.feedback("any-trace", 0.9, capability="whoami") == "whoami"
    with pytest.raises(CallError) as unnamed:
        await client.feedback("any-trace", 0.9)
    assert unnamed.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "capability" in unnamed.value.message
    assert answer["backend"] == "a"
    # Followups reaches the owning member (no follow-up comes: the stream runs until the
    # deadline), where an unrouted method would be UNIMPLEMENTED at once.
    stub = actors_pb2_grpc.ActorRuntimeStub(client.channel)
    stream = stub.Followups(actors_pb2.FollowupsRequest(type="ledger", id="f-1"), timeout=1)
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        async for _ in stream:
            pass
    assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


# ---------------------------------------------------------------- the real process


async def test_the_gateway_process_reloads_routes_and_keeps_serving_past_a_bad_file(
        tmp_path: Path, backends: dict[str, RuntimeProcess]) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(f"capabilities:\n  whoami: ['{backends['a'].address}']\n")
    port = free_port()
    process = gateway_process(routes, tmp_path / "gateway.log", port)
    try:
        async with RuntimeClient(f"127.0.0.1:{port}") as client:
            answer = await client.invoke("whoami", {"message": "x"}, timeout=30,
                                         wait_for_ready=True)
            assert answer["backend"] == "a"
            routes.write_text("capabilities:\n  whoami: {backends: [nowhere], canary: "
                              "{weight: 300}}\n")
            await eventually(lambda: "routes not reloaded" in (tmp_path / "gateway.log")
                             .read_text(), timeout=30)
            log = (tmp_path / "gateway.log").read_text()
            assert f"{routes}:2: capabilities.whoami.backends[0]" in log
            assert "capabilities.whoami.canary.weight" in log
            assert (await client.invoke("whoami", {"message": "x"}, timeout=10))["backend"] \
                == "a"
            routes.write_text(f"capabilities:\n  whoami: ['{backends['b'].address}']\n"
                              f"  slow: ['{backends['a'].address}']\n")

            async def switched() -> bool:
                answer = await client.invoke("whoami", {"message": "x"}, timeout=10)
                return bool(answer["backend"] == "b")

            await eventually(switched, timeout=30, what="the reloaded routes")
            assert (await client.invoke("slow", {"message": "y"}, timeout=10))["message"] == "y"
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0


def test_a_bad_routes_file_or_no_source_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text("capabilities:\n  Bad_Name: [127.0.0.1:1]\nextra: 1\n")
    settings = GatewaySettings(gateway_routes=routes, address="127.0.0.1:0",
                               metrics_address=None)
    assert asyncio.run(serve_gateway(settings)) == 1
    stderr = capsys.readouterr().err
    assert f"error: {routes}:2: capabilities.Bad_Name" in stderr
    assert f"error: {routes}:3: extra: unknown field" in stderr
    args = build_parser().parse_args(["gateway"])
    assert args.func(args) == 2
    assert "--routes FILE or --kubernetes" in capsys.readouterr().err
