"""Two organizations' federation gateways, in process, over real mutual TLS 1.3: imports,
catalogs, deadlines and traces, contracts on both sides, metering, SLA, probes, audit."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import orjson
import pytest

from packetflow.client import CallError, RuntimeClient
from packetflow.context import TRACE_ID_KEY, CallContext
from packetflow.engine import Engine
from packetflow.errors import NotServable, Unavailable
from packetflow.federation.audit import INBOUND, OUTBOUND, verify
from packetflow.federation.gateway import Gateway
from packetflow.manifests import load_text
from packetflow.v1 import federation_pb2, runtime_pb2
from tests.conftest import eventually
from tests.support.federation import (
    CALLS,
    DEFAULT_EXPORTS,
    EXPORTER_MANIFESTS,
    Federation,
    audit_of,
    config_text,
    make_org,
    running_federation,
)


@pytest.fixture
async def federation(tmp_path: Path) -> AsyncIterator[Federation]:
    async with running_federation(tmp_path) as running:
        yield running


async def test_import_is_a_capability_with_trace_and_deadline_kept(
        federation: Federation) -> None:
    async with RuntimeClient(f"127.0.0.1:{federation.importer.local_port}") as client:
        names = {c.name: c.implementation for c in await client.list()}
        assert names["globex-translate"] == "federated"
        described = await client.describe("globex-translate")
        assert described["requires"]["properties"] == {"text": {"type": "string"}}
        assert described["dependencies"][0]["target"] == "translate @ globex"
        CALLS.clear()
        output = await client.invoke("globex-translate", {"text": "bonjour"}, timeout=20,
                                     trace_id="feedfacecafebeef")
    assert output == {"text": "[fr] bonjour"}
    (seen,) = [c for c in CALLS if c["capability"] == "translate"]
    assert seen["trace_id"] == "feedfacecafebeef"
    assert seen["caller"] == "federation:acme"
    # The caller's 20 s, not the capability's own 30 s: the deadline crossed both gateways.
    assert seen["remaining"] is not None and 0 < seen["remaining"] < 25
    for gateway, direction in ((federation.importer, OUTBOUND),
                               (federation.exporter, INBOUND)):
        (record,) = [r.record for r in await audit_of(gateway)
                     if r.record.trace_id == "feedfacecafebeef"]
        assert (record.direction, record.code, record.decision) == (direction, "OK", "allow")
        assert record.price == 0.5 and record.currency == "EUR"
        assert record.bytes_in == len(b'{"text":"bonjour"}')
        assert len(record.input_sha256) == 64 and len(record.fingerprint) == 64


async def test_deadline_crosses_both_gateways(federation: Federation) -> None:
    stub = federation.local_stub()
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Invoke(runtime_pb2.InvokeRequest(
            capability="globex-slow", input_json=b'{"seconds": 30}'), timeout=1.0)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 20
    (seen,) = [c for c in CALLS if c["capability"] == "slow"]
    assert seen["remaining"] is not None and seen["remaining"] < 5  # the caller's 1 s, not 30 s


async def test_contract_checked_before_leaving_and_on_arrival(
        federation: Federation) -> None:
    async with RuntimeClient(f"127.0.0.1:{federation.importer.local_port}") as client:
        with pytest.raises(CallError) as caught:
            await client.invoke("globex-translate", {"txt": "x"})
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {v.field for v in caught.value.violations} == {"input.text", "input.txt"}
    # A peer that skips its own gateway's check is stopped by the exporter's.
    with pytest.raises(grpc.aio.AioRpcError) as raw:
        await federation.acme_stub().Invoke(runtime_pb2.InvokeRequest(
            capability="translate", input_json=b'{"text": 3}'), timeout=10)
    assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not [c for c in CALLS if c["capability"] == "translate" and c["caller"]
                and "probe" not in str(c)]
    records = [r.record for r in await audit_of(federation.exporter)]
    assert any(r.code == "INVALID_ARGUMENT" and r.reason.startswith("invalid-input")
               for r in records)


async def test_catalog_lists_only_what_is_exported_to_the_caller(
        federation: Federation) -> None:
    catalog = await federation.acme_stub().GetCatalog(federation_pb2.CatalogRequest(),
                                                      timeout=10)
    names = sorted(entry["capability"] for entry in orjson.loads(catalog.entries_json))
    assert names == ["sale", "slow", "translate"]  # payroll is initech's only
    assert catalog.organization == "globex"
    unchanged = await federation.acme_stub().GetCatalog(
        federation_pb2.CatalogRequest(known_version=catalog.version), timeout=10)
    assert unchanged.unchanged and not unchanged.entries_json
    initech = federation.initech.leaf()
    theirs = await federation.peer_stub(initech.certificate_pem, initech.key_pem).GetCatalog(
        federation_pb2.CatalogRequest(), timeout=10)
    assert [e["capability"] for e in orjson.loads(theirs.entries_json)] == ["payroll"]


async def test_import_rechecked_when_the_peers_catalog_changes(
        federation: Federation) -> None:
    changed = EXPORTER_MANIFESTS.replace(
        "requires: {text: {type: string}}",
        "requires: {text: {type: string}, lang: {type: string}}", 1)
    federation.runtime.engine.replace(load_text(changed).capabilities)
    await federation.exporter.refresh_local()
    imported = federation.importer.imports["globex-translate"]
    await eventually(lambda: imported.problem is not None, timeout=30,
                     what="the incompatible contract to be noticed")
    assert "requires.lang: the peer requires this field" in str(imported.problem)
    async with RuntimeClient(f"127.0.0.1:{federation.importer.local_port}") as client:
        with pytest.raises(CallError) as caught:
            await client.invoke("globex-translate", {"text": "x"})
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "requires.lang" in caught.value.message
    # Back to the contract it was loaded with: compatible again.
    federation.runtime.engine.replace(load_text(EXPORTER_MANIFESTS).capabilities)
    await federation.exporter.refresh_local()
    await eventually(lambda: imported.problem is None, timeout=30, what="recovery")


async def test_federated_capability_in_a_runtime_is_checked_when_loaded(
        federation: Federation) -> None:
    gateway = f"127.0.0.1:{federation.importer.local_port}"
    manifest = ("apiVersion: packetflow.io/v1alpha1\nkind: Capability\n"
                "metadata: {name: french}\nspec:\n  intent: x\n"
                "  requires: {text: {type: string}}\n  provides: {text: {type: string}}\n"
                "  implementation: {federated: {peer: globex, capability: translate, "
                f"gateway: '{gateway}'}}}}\n")
    engine = Engine(load_text(manifest).capabilities)
    try:
        assert await engine.verify_remotes() == []
        output = await engine.invoke("french", {"text": "salut"},
                                     CallContext("french", "abc123"))
        assert output == {"text": "[fr] salut"}
    finally:
        await engine.aclose()
    wrong = manifest.replace("provides: {text: {type: string}}",
                             "provides: {text: {type: integer}}")
    engine = Engine(load_text(wrong).capabilities)
    try:
        (error,) = await engine.verify_remotes()
        assert error.path == "spec.provides.text"
        assert "the peer returns string, local integer" in error.message
    finally:
        await engine.aclose()


async def test_prices_follow_each_model(federation: Federation) -> None:
    async with RuntimeClient(f"127.0.0.1:{federation.importer.local_port}") as client:
        await client.invoke("globex-sale", {"amount": 200.0}, trace_id="sale1")
    (record,) = [r.record for r in await audit_of(federation.exporter)
                 if r.record.trace_id == "sale1"]
    assert record.price == pytest.approx(20.0)  # 10% of the output's revenue


async def test_sla_probe_runs_without_traffic_and_breaches_are_counted(
        tmp_path: Path) -> None:
    exports = DEFAULT_EXPORTS.replace("latencyP99Ms: 5000", "latencyP99Ms: 0.001").replace(
        "availability: 50", "availability: 50, window: 1s")
    async with running_federation(tmp_path, exports=exports) as federation:
        async def probed() -> bool:
            records = [r.record for r in await audit_of(federation.exporter)]
            return any(r.reason == "sla probe" and r.code == "OK" for r in records)

        await eventually(probed, timeout=30, what="a probe call")

        def breached() -> bool:
            status = federation.exporter.status()
            export = next(e for e in status["exports"] if e["capability"] == "translate")
            imported = next(i for i in federation.importer.status()["imports"]
                            if i["name"] == "globex-translate")
            return export["slaBreaches"] >= 1 and imported["slaBreaches"] >= 1

        await eventually(breached, timeout=30, what="an SLA breach on both sides")
        probes = [r.record for r in await audit_of(federation.exporter)
                  if r.record.reason == "sla probe"]
        assert all(r.price == 0.0 for r in probes)  # probes are not billed


async def test_status_explains_peers_exports_and_the_audit_head(
        federation: Federation) -> None:
    async with RuntimeClient(f"127.0.0.1:{federation.importer.local_port}") as client:
        await client.invoke("globex-translate", {"text": "a"})
    def acme_connected() -> bool:
        peers = federation.exporter.status()["peers"]
        return bool(next(p for p in peers if p["name"] == "acme")["connected"])

    await eventually(acme_connected, timeout=30, what="globex to read acme's catalog")
    status = federation.exporter.status()
    acme = next(p for p in status["peers"] if p["name"] == "acme")
    assert acme["catalogVersion"]
    assert acme["certificateExpiry"] and acme["lastHandshake"]
    assert set(acme["trust"]) == {"reliability", "performance", "securityCompliance"}
    assert acme["trust"]["securityCompliance"]["observations"] >= 1
    translate = next(e for e in status["exports"] if e["capability"] == "translate")
    assert translate["calls"] >= 1 and translate["byPeer"]["acme"]["calls"] >= 1
    rows = await audit_of(federation.exporter)
    assert status["audit"]["headHash"] == rows[-1].hash
    assert verify(rows) == []
    importer = federation.importer.status()
    globex = importer["peers"][0]
    assert globex["connected"] and globex["certificateExpiry"] and globex["lastHandshake"]
    assert importer["imports"][0]["ready"] is True


async def test_channels_are_reused(federation: Federation) -> None:
    async with RuntimeClient(f"127.0.0.1:{federation.importer.local_port}") as client:
        # The data path's connection opens after the first catalog read, maybe still under
        # way: once one call has passed, no further call may cost a handshake.
        await client.invoke("globex-translate", {"text": "first"})
        before = federation.exporter.terminator.handshakes
        for index in range(20):
            await client.invoke("globex-translate", {"text": str(index)})
    assert federation.exporter.terminator.handshakes == before


async def test_local_port_serves_every_runtime_method_not_only_invoke(
        federation: Federation) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = federation.local_stub()
    listed = await stub.ListCapabilities(runtime_pb2.ListCapabilitiesRequest(), timeout=10)
    assert "globex-translate" in [c.name for c in listed.capabilities]
    events = [event async for event in stub.InvokeStream(runtime_pb2.InvokeRequest(
        capability="globex-translate", input_json=b'{"text": "s"}'), timeout=10)]
    assert orjson.loads(events[-1].result.output_json) == {"text": "[fr] s"}
    health = health_pb2_grpc.HealthStub(federation.channels[-1])
    answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_trace_id_comes_back_to_the_caller(federation: Federation) -> None:
    stub = federation.local_stub()
    call = stub.Invoke(runtime_pb2.InvokeRequest(capability="globex-translate",
                                                 input_json=b'{"text": "t"}'),
                       metadata=((TRACE_ID_KEY, "0123456789abcdef"),), timeout=10)
    response = await call
    assert response.trace_id == "0123456789abcdef"


async def test_nothing_runs_unaudited_when_the_audit_log_fails(
        federation: Federation) -> None:
    import sqlite3

    stub = federation.acme_stub()
    request = runtime_pb2.InvokeRequest(capability="translate", input_json=b'{"text": "a"}')
    await stub.Invoke(request, timeout=10)
    with sqlite3.connect(federation.globex.directory / "state" / "federation.db") as db:
        db.execute("ALTER TABLE pf_federation_audit RENAME TO moved_away")
    # The first call after the breakage ran (its record is what failed); from then on the
    # gateway refuses before anything reaches the capability.
    with pytest.raises(grpc.aio.AioRpcError) as first:
        await stub.Invoke(request, timeout=10)
    assert first.value.code() == grpc.StatusCode.UNAVAILABLE
    def ran() -> int:
        return len([c for c in CALLS if c["capability"] == "translate" and c["text"] == "a"])

    before = ran()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Invoke(request, timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "audit log" in (refused.value.details() or "")
    assert ran() == before


async def test_federated_capability_loads_before_its_gateway_and_checks_at_first_call(
        federation: Federation) -> None:
    def manifest(gateway: str, provides: str) -> str:
        return ("apiVersion: packetflow.io/v1alpha1\nkind: Capability\n"
                "metadata: {name: french}\nspec:\n  intent: x\n"
                f"  provides: {{text: {{type: {provides}}}}}\n"
                "  implementation: {federated: {peer: globex, capability: translate, "
                f"gateway: '{gateway}'}}}}\n")

    down = Engine(load_text(manifest("127.0.0.1:1", "string")).capabilities)
    try:
        assert await down.verify_remotes() == []  # no gateway yet: no verdict
        with pytest.raises(Unavailable):
            await down.invoke("french", {"text": "x"}, CallContext("french", "t1"))
    finally:
        await down.aclose()
    # Loaded while unchecked, then the first call finds the mismatch and refuses.
    gateway = f"127.0.0.1:{federation.importer.local_port}"
    engine = Engine(load_text(manifest(gateway, "integer")).capabilities)
    try:
        handler = engine.get("french").handler
        handler.checked_version = None  # as if verify had found no gateway
        with pytest.raises(NotServable, match=r"provides\.text"):
            await engine.invoke("french", {"text": "x"}, CallContext("french", "t2"))
    finally:
        await engine.aclose()



async def test_a_gateway_whose_start_failed_half_way_stops(tmp_path: Path) -> None:
    """Its inner server listens when its local port turns out to be taken: stop ends it (a
    grpc.aio server left running holds the event loop at exit)."""
    org, peer = make_org(tmp_path, "acme"), make_org(tmp_path, "globex")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        config = tmp_path / "federation.yaml"
        config.write_text(config_text(org, [(peer, "127.0.0.1:1")],
                                      local=f"127.0.0.1:{taken.getsockname()[1]}"))
        gateway = Gateway(config)
        with pytest.raises(OSError):
            await gateway.start()
        assert inner_servers() == 1
        await asyncio.wait_for(gateway.stop(grace=0), 60)
        await eventually(lambda: inner_servers() == 0, timeout=30,
                         what="the inner server's socket closed")


def inner_servers() -> int:
    """Unix sockets this process holds in a federation gateway's private directory."""
    with open("/proc/net/unix") as table:
        paths = {fields[6]: fields[7] for line in table.read().splitlines()[1:]
                 if len(fields := line.split()) > 7}
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed since listed
            target = os.readlink(f"/proc/self/fd/{fd}")
            count += "/packetflow-federation-" in paths.get(target[len("socket:["):-1], "")
    return count
