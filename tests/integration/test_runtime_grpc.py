"""The runtime over real gRPC: happy paths, every error path, and that it keeps serving."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import orjson
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from packetflow.client import CallError, ProgressEvent, RuntimeClient
from packetflow.rpc import SERVICE_NAME
from packetflow.server import RuntimeServer
from packetflow.v1 import runtime_pb2
from tests.conftest import eventually
from tests.support import handlers


async def assert_still_serving(client: RuntimeClient) -> None:
    assert await client.invoke("add", {"a": 1, "b": 2}) == {"sum": 3}


async def test_invoke_applies_defaults(client: RuntimeClient) -> None:
    assert await client.invoke("add", {"a": 40, "b": 2}) == {"sum": 42}
    assert await client.invoke("add", {"a": 5}) == {"sum": 5}


async def test_python_handler_with_pydantic_model(client: RuntimeClient) -> None:
    assert await client.invoke("price", {"item": "tea", "quantity": 4}) == {
        "total": 12, "item": "tea"}


async def test_context_carries_caller_trace_and_deadline(client: RuntimeClient) -> None:
    out = await client.invoke("whoami", {}, timeout=5, trace_id="trace-123")
    assert out == {"caller": "tests", "trace_id": "trace-123", "has_deadline": True,
                   "effects": ["network"]}


@pytest.mark.parametrize(("payload", "field", "fragment"), [
    (b"{not json", "input", "not valid JSON"),
    (b"[1, 2]", "input", "must be a JSON object"),
    (orjson.dumps({"a": "one"}), "input.a", "is not of type 'integer'"),
    (orjson.dumps({"b": 1}), "input.a", "required field is missing"),
    (orjson.dumps({"a": 1, "c": 2}), "input.c", "unknown field"),
])
async def test_bad_input_is_invalid_argument_naming_the_field(
        client: RuntimeClient, payload: bytes, field: str, fragment: str) -> None:
    with pytest.raises(CallError) as caught:
        await client.invoke_raw("add", payload)
    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.message and fragment in error.message
    assert [v.field for v in error.violations] == [field]
    assert error.trace_id
    await assert_still_serving(client)


async def test_unknown_capability_is_not_found(client: RuntimeClient) -> None:
    with pytest.raises(CallError) as caught:
        await client.invoke("nope", {})
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert "'nope'" in caught.value.message
    await assert_still_serving(client)


async def test_oversized_payload_is_resource_exhausted(client: RuntimeClient) -> None:
    # The fixture's limit is 64 KiB: just over it is refused by the engine ...
    with pytest.raises(CallError) as caught:
        await client.invoke("echo", {"message": "x" * (65 * 1024)})
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limit is 65536" in caught.value.message
    # ... and far over it by gRPC's own message limit, before any parsing.
    with pytest.raises(CallError) as caught:
        await client.invoke("echo", {"message": "x" * (1024 * 1024)})
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    await assert_still_serving(client)


async def test_caller_deadline_cancels_the_handler(client: RuntimeClient) -> None:
    gate = uuid.uuid4().hex
    handlers.GATES[gate] = asyncio.Event()
    with pytest.raises(CallError) as caught:
        # Long enough for the call to reach the handler on a busy machine (the gate never
        # opens, so the deadline always ends it).
        await client.invoke("hold", {"gate": gate}, timeout=1, trace_id=gate)
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    await eventually(lambda: gate in handlers.CANCELLED, what="handler cancellation")
    await assert_still_serving(client)


async def test_capability_timeout_is_deadline_exceeded(client: RuntimeClient) -> None:
    gate = uuid.uuid4().hex
    handlers.GATES[gate] = asyncio.Event()
    with pytest.raises(CallError) as caught:
        await client.invoke("short-timeout", {"gate": gate}, trace_id=gate)
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "deadline" in caught.value.message
    assert gate in handlers.CANCELLED
    await assert_still_serving(client)


async def test_over_concurrency_is_resource_exhausted(client: RuntimeClient) -> None:
    gate = uuid.uuid4().hex
    handlers.GATES[gate] = asyncio.Event()
    traces = [f"{gate}-{i}" for i in range(2)]
    held = [asyncio.create_task(client.invoke("hold", {"gate": gate}, trace_id=t))
            for t in traces]
    await eventually(lambda: all(t in handlers.STARTED for t in traces), what="2 calls running")
    with pytest.raises(CallError) as caught:
        await client.invoke("hold", {"gate": gate})
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "concurrency limit (2" in caught.value.message
    handlers.GATES[gate].set()
    assert [await task for task in held] == [{"gate": gate}] * 2
    await assert_still_serving(client)


async def test_contract_breaking_handler_is_internal_and_counted(
        client: RuntimeClient, runtime: RuntimeServer) -> None:
    with pytest.raises(CallError) as caught:
        await client.invoke("broken", {})
    error = caught.value
    assert error.code == grpc.StatusCode.INTERNAL
    assert "broke its provides contract" in error.message
    assert {v.field for v in error.violations} == {"output.answer", "output.unexpected"}
    violations = runtime.engine.metrics.registry.get_sample_value(
        "packetflow_contract_violations_total", {"capability": "broken"})
    assert violations == 1.0
    await assert_still_serving(client)


async def test_raising_handler_is_internal_without_leaking(
        client: RuntimeClient, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(CallError) as caught:
        await client.invoke("raises", {}, trace_id="leak-check")
    assert caught.value.code == grpc.StatusCode.INTERNAL
    assert "hunter2" not in caught.value.message
    assert "Traceback" not in caught.value.message
    assert "leak-check" in caught.value.message
    assert "hunter2" in caplog.text  # the operator can still find out what happened
    await assert_still_serving(client)


async def test_image_capability_is_refused_locally(client: RuntimeClient) -> None:
    with pytest.raises(CallError) as caught:
        await client.invoke("container", {})
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "operator" in caught.value.message


async def test_invoke_stream_sends_progress_then_result(client: RuntimeClient) -> None:
    events: list[ProgressEvent] = []
    result = await client.invoke_stream("progress", {"steps": 3}, on_progress=events.append)
    assert result == {"steps": 3}
    assert [e.message for e in events] == ["step 1 of 3", "step 2 of 3", "step 3 of 3"]
    assert events[-1].fraction == pytest.approx(1.0)


async def test_invoke_stream_reports_errors_as_status(client: RuntimeClient) -> None:
    with pytest.raises(CallError) as caught:
        await client.invoke_stream("progress", {"steps": 0})
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.violations[0].field == "input.steps"


async def test_list_and_describe(client: RuntimeClient) -> None:
    names = [c.name for c in await client.list()]
    assert names == sorted(names) and {"add", "echo", "container"} <= set(names)
    described = await client.describe("add")
    assert described["requires"] == {
        "type": "object", "additionalProperties": False, "required": ["a"],
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer", "default": 0}}}
    assert described["provides"]["properties"] == {"sum": {"type": "integer"}}
    assert described["implementation"] == "builtin"
    with pytest.raises(CallError) as caught:
        await client.describe("nope")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND


async def test_health_and_reflection(runtime: RuntimeServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        services = set()
        async for response in stub.ServerReflectionInfo(iter([request])):
            services = {s.name for s in response.list_services_response.service}
        assert {SERVICE_NAME, "grpc.health.v1.Health"} <= services


async def test_graceful_shutdown_drains_in_flight_calls(runtime: RuntimeServer) -> None:
    gate = uuid.uuid4().hex
    handlers.GATES[gate] = asyncio.Event()
    address = f"127.0.0.1:{runtime.port}"
    async with RuntimeClient(address) as client, grpc.aio.insecure_channel(address) as channel:
        call = asyncio.create_task(client.invoke("hold", {"gate": gate}, trace_id=gate))
        await eventually(lambda: gate in handlers.STARTED, what="call running")
        # A drain far longer than the test: NOT_SERVING is seen however late the check runs,
        # and new calls are still served meanwhile.
        draining = asyncio.create_task(runtime.stop(grace=10, drain=3600))
        health = health_pb2_grpc.HealthStub(channel)

        async def not_serving() -> bool:
            reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
            return reply.status == health_pb2.HealthCheckResponse.NOT_SERVING

        await eventually(not_serving, what="health NOT_SERVING while draining")
        assert await client.invoke("add", {"a": 1}) == {"sum": 1}
        # The drain is a wait: cutting it short moves on to refusing calls, while the call in
        # flight may still finish (within the grace period).
        draining.cancel()
        await asyncio.gather(draining, return_exceptions=True)
        stopping = asyncio.create_task(runtime.stop(grace=10))

        async def refused() -> bool:
            try:
                await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
            except grpc.aio.AioRpcError:
                return True
            return False

        await eventually(refused, what="new calls refused")
        assert not call.done()
        handlers.GATES[gate].set()
        assert await call == {"gate": gate}
        await stopping


async def test_metrics_count_calls_by_code(client: RuntimeClient, runtime: RuntimeServer) -> None:
    await client.invoke("add", {"a": 1})
    with pytest.raises(CallError):
        await client.invoke("add", {"a": "x"})
    sample = runtime.engine.metrics.registry.get_sample_value
    assert sample("packetflow_capability_calls_total", {"capability": "add", "code": "OK"}) == 1
    assert sample("packetflow_capability_calls_total",
                  {"capability": "add", "code": "INVALID_ARGUMENT"}) == 1
    assert sample("packetflow_capability_call_duration_seconds_count", {"capability": "add"}) == 2
    assert sample("packetflow_capability_in_flight", {"capability": "add"}) == 0


async def test_raw_stub_round_trip(runtime: RuntimeServer) -> None:
    """The generated stub alone is enough to call a capability (what other languages do)."""
    from packetflow.v1 import runtime_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.port}") as channel:
        stub = runtime_pb2_grpc.CapabilityRuntimeStub(channel)
        reply = await stub.Invoke(runtime_pb2.InvokeRequest(
            capability="echo", input_json=b'{"message": "hi"}'))
        assert orjson.loads(reply.output_json) == {"message": "hi"} and reply.trace_id
