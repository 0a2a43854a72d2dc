"""Federation security, one case per test: each attempt is refused, written to the audit log,
and leaves nothing half-done (the exporter's capability never ran, no connection stays)."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from packetflow.cli import main
from packetflow.client import CallError, RuntimeClient
from packetflow.federation import trust
from packetflow.federation.audit import AuditRecord
from packetflow.federation.datapath import PROBE_KEY
from packetflow.federation.gateway import Gateway
from packetflow.identity.certs import Issued, new_authority
from packetflow.identity.spiffe import SpiffeId
from packetflow.v1 import runtime_pb2, runtime_pb2_grpc
from tests.conftest import eventually
from tests.support.federation import (
    CALLS,
    DEFAULT_EXPORTS,
    Federation,
    audit_of,
    expired,
    not_yet_valid,
    running_federation,
    write_atomically,
)

ROOT = Path(__file__).resolve().parents[2]
TRANSLATE = runtime_pb2.InvokeRequest(capability="translate", input_json=b'{"text": "hi"}')


@pytest.fixture
async def federation(tmp_path: Path) -> AsyncIterator[Federation]:
    async with running_federation(tmp_path) as running:
        yield running


def fingerprint(issued: Issued) -> str:
    return hashlib.sha256(issued.certificate.public_bytes(serialization.Encoding.DER)
                          ).hexdigest()


async def refusals(gateway: Gateway, reason: str) -> list[AuditRecord]:
    """Audit records of refusals whose reason starts with ``reason``."""
    return [r.record for r in await audit_of(gateway)
            if r.record.decision == "deny" and r.record.reason.startswith(reason)]


async def refused_in_audit(gateway: Gateway, reason: str) -> list[AuditRecord]:
    """Wait for (and return) the refusal records of ``reason``."""
    found: list[AuditRecord] = []

    async def appeared() -> bool:
        found[:] = await refusals(gateway, reason)
        return bool(found)

    await eventually(appeared, timeout=30, what=f"an audited refusal {reason!r}")
    return found


def translations() -> int:
    """How many calls reached globex's translate (probes excluded)."""
    return sum(1 for c in CALLS if c["capability"] == "translate" and c["text"] != "probe")


async def unavailable(stub: object, request: runtime_pb2.InvokeRequest = TRANSLATE) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Invoke(request, timeout=10)  # type: ignore[attr-defined]
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_expired_client_certificate_is_refused(federation: Federation) -> None:
    before = translations()
    cert = expired(federation.acme)
    await unavailable(federation.peer_stub(cert.certificate_pem, cert.key_pem))
    (record,) = await refused_in_audit(federation.exporter, "expired")
    assert record.fingerprint == fingerprint(cert)
    assert record.peer == "acme" and record.code == "UNAUTHENTICATED"
    assert translations() == before
    assert all(c.identity.certificate.fingerprint != fingerprint(cert)
               for c in federation.exporter.terminator.connections.values())
    evidence = federation.exporter.trust.evidence[("acme", trust.SECURITY)]
    assert evidence.negative > 0  # attributed to acme


async def test_not_yet_valid_client_certificate_is_refused(federation: Federation) -> None:
    before = translations()
    cert = not_yet_valid(federation.acme)
    await unavailable(federation.peer_stub(cert.certificate_pem, cert.key_pem))
    (record,) = await refused_in_audit(federation.exporter, "not-yet-valid")
    assert record.fingerprint == fingerprint(cert)
    assert translations() == before


async def test_certificate_for_the_wrong_trust_domain_is_refused(
        federation: Federation) -> None:
    # acme's authority is trusted (for acme.example), so the TLS layer lets this through;
    # no peer has the trust domain it names.
    cert = federation.acme.leaf(spiffe_id=SpiffeId.of("evil.example", "gateway"),
                                check_trust_domain=False)
    await unavailable(federation.peer_stub(cert.certificate_pem, cert.key_pem))
    (record,) = await refused_in_audit(federation.exporter, "unknown-trust-domain")
    assert "evil.example" in record.reason and record.peer == ""
    assert record.fingerprint == fingerprint(cert)


async def test_one_peers_authority_claiming_another_peers_domain_is_refused(
        federation: Federation) -> None:
    # globex trusts initech's authority (for initech.example) and acme's (for acme.example):
    # initech's authority vouching for an acme.example ID is refused by the bundle rule.
    before = translations()
    forged = federation.initech.leaf(
        spiffe_id=SpiffeId.of("acme.example", "federation", "gateway"),
        check_trust_domain=False)
    await unavailable(federation.peer_stub(forged.certificate_pem, forged.key_pem))
    (record,) = await refused_in_audit(federation.exporter, "untrusted-issuer")
    assert "acme.example" in record.reason and record.fingerprint == fingerprint(forged)
    assert translations() == before


async def test_globex_authority_claiming_acme_domain_is_refused_by_acme(
        federation: Federation) -> None:
    # At acme's gateway globex's authority is trusted for globex.example only.
    forged = federation.globex.leaf(
        spiffe_id=SpiffeId.of("acme.example", "federation", "gateway"),
        check_trust_domain=False)
    stub = federation.peer_stub(forged.certificate_pem, forged.key_pem,
                                port=federation.importer.peer_port,
                                trust=federation.acme.ca.read_bytes())
    await unavailable(stub)
    (record,) = await refused_in_audit(federation.importer, "unknown-trust-domain")
    assert record.fingerprint == fingerprint(forged)


async def test_client_without_certificate_is_refused(federation: Federation) -> None:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=federation.globex.ca.read_bytes())
    async with grpc.aio.secure_channel(f"127.0.0.1:{federation.exporter.peer_port}",
                                       credentials) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary("/packetflow.v1.Federation/Invoke")(
                TRANSLATE.SerializeToString(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    (record,) = await refused_in_audit(federation.exporter, "no-client-certificate")
    assert record.fingerprint == "" and record.address.startswith("127.0.0.1:")


async def test_plaintext_connection_is_refused(federation: Federation) -> None:
    async with grpc.aio.insecure_channel(
            f"127.0.0.1:{federation.exporter.peer_port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary("/packetflow.v1.Federation/Invoke")(
                TRANSLATE.SerializeToString(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    (record, *_) = await refused_in_audit(federation.exporter, "plaintext")
    assert record.code == "UNAUTHENTICATED"


async def test_tls_older_than_1_3_is_refused(federation: Federation) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cadata=federation.globex.ca.read_text())
    context.load_cert_chain(federation.acme.cert, federation.acme.key)
    context.check_hostname = False
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await asyncio.open_connection("127.0.0.1", federation.exporter.peer_port,
                                      ssl=context)
    await refused_in_audit(federation.exporter, "tls-version")


async def test_removed_peer_is_refused_after_a_config_reload(federation: Federation) -> None:
    stub = federation.acme_stub()
    await stub.Invoke(TRANSLATE, timeout=10)  # a live, authenticated connection
    before = translations()
    generation = federation.exporter.watch.generation
    federation.write_exporter_config(peers=[(federation.initech, "127.0.0.1:1")],
                                     exports="\n    - {capability: payroll, to: [initech]}\n")
    await eventually(lambda: federation.exporter.current() is not None
                     and federation.exporter.watch.generation > generation, timeout=30,
                     what="the exporter to reload its config")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Invoke(TRANSLATE, timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "no longer configured" in (caught.value.details() or "")
    await refused_in_audit(federation.exporter, "peer-removed")
    # New connections fail at the handshake: acme's authority is no longer trusted at all.
    await unavailable(federation.acme_stub())
    await refused_in_audit(federation.exporter, "untrusted-certificate")
    assert translations() == before


async def test_peer_whose_bundle_was_rotated_away_is_refused(federation: Federation) -> None:
    stub = federation.acme_stub()
    await stub.Invoke(TRANSLATE, timeout=10)
    before = translations()
    generation = federation.exporter.watch.generation
    # globex now trusts another authority for acme.example (acme's bundle file changed).
    write_atomically(federation.acme.ca,
                     new_authority("acme.example", "acme").certificate_pem)
    await eventually(lambda: federation.exporter.current() is not None
                     and federation.exporter.watch.generation > generation, timeout=30,
                     what="the exporter to reload the bundle")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Invoke(TRANSLATE, timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await refused_in_audit(federation.exporter, "authority-rotated")
    assert translations() == before


async def test_export_not_granted_is_refused(federation: Federation) -> None:
    stub = federation.acme_stub()
    for capability in ("payroll", "no-such-capability"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Invoke(runtime_pb2.InvokeRequest(capability=capability,
                                                        input_json=b"{}"), timeout=10)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # The same words either way: whether a capability exists does not leak.
        assert caught.value.details() == f"capability {capability!r} is not exported to acme"
    records = await refused_in_audit(federation.exporter, "not-exported")
    assert {r.capability for r in records} == {"payroll", "no-such-capability"}
    assert all(r.peer == "acme" for r in records)
    assert not [c for c in CALLS if c["capability"] == "payroll"]


async def test_peer_port_serves_the_federation_service_only(federation: Federation) -> None:
    federation.acme_stub()  # an authenticated peer connection
    runtime = runtime_pb2_grpc.CapabilityRuntimeStub(federation.channels[-1])
    before = translations()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await runtime.Invoke(TRANSLATE, timeout=10)  # the runtime's own method, not ours
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "not served to peers" in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as listed:
        await runtime.ListCapabilities(runtime_pb2.ListCapabilitiesRequest(), timeout=10)
    assert listed.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert translations() == before
    await federation.acme_stub().Invoke(TRANSLATE, timeout=10)  # the connection still serves
    assert translations() == before + 1


async def test_spoofed_caller_and_organization_metadata_are_ignored(
        federation: Federation) -> None:
    spoof = (("packetflow-organization", "initech"), ("packetflow-caller", "initech"))
    stub = federation.acme_stub()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Invoke(runtime_pb2.InvokeRequest(capability="payroll", input_json=b"{}"),
                          metadata=spoof, timeout=10)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED  # still acme
    (record,) = await refused_in_audit(federation.exporter, "not-exported")
    assert record.peer == "acme"
    assert "packetflow-organization=initech" in record.notes
    assert not [c for c in CALLS if c["capability"] == "payroll"]
    CALLS.clear()
    await stub.Invoke(TRANSLATE, metadata=(*spoof, ("packetflow-trace-id", "spoof1")),
                      timeout=10)
    (seen,) = [c for c in CALLS if c["trace_id"] == "spoof1"]
    assert seen["caller"] == "federation:acme"  # served as the certificate says
    (served,) = [r.record for r in await audit_of(federation.exporter)
                 if r.record.trace_id == "spoof1"]
    assert "packetflow-caller=initech" in served.notes


async def test_call_past_the_rate_limit_is_refused(tmp_path: Path) -> None:
    exports = DEFAULT_EXPORTS.replace("- {capability: slow, to: [acme]}",
                                      "- {capability: slow, to: [acme], "
                                      "rateLimit: {perMinute: 6, burst: 2}}")
    async with running_federation(tmp_path, exports=exports) as federation:
        stub = federation.acme_stub()
        request = runtime_pb2.InvokeRequest(capability="slow", input_json=b'{"seconds": 0}')
        for _ in range(2):
            await stub.Invoke(request, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Invoke(request, timeout=10)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "rate limit of 6/minute" in (caught.value.details() or "")
        await refused_in_audit(federation.exporter, "rate-limit")
        assert len([c for c in CALLS if c["capability"] == "slow"]) == 2


async def test_peer_below_the_trust_threshold_is_refused(tmp_path: Path) -> None:
    strict = "{minimumScore: 0.8, priorWeight: 2}"
    async with running_federation(tmp_path, trust=strict) as federation:
        stub = federation.acme_stub()
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.Invoke(runtime_pb2.InvokeRequest(capability="translate",
                                                        input_json=b'{"text": 3}'),
                              timeout=10)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # evidence: reliability
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Invoke(TRANSLATE, metadata=(("packetflow-trace-id", "low1"),),
                              timeout=10)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "below the trust threshold on reliability" in (caught.value.details() or "")
        (record,) = await refused_in_audit(federation.exporter, "trust")
        assert record.trace_id == "low1"
        assert not [c for c in CALLS if c["trace_id"] == "low1"]
        # The SLA probe still passes, so evidence keeps coming in.
        await stub.Invoke(runtime_pb2.InvokeRequest(capability="translate",
                                                    input_json=b'{"text": "probe"}'),
                          metadata=((PROBE_KEY, "1"), ("packetflow-trace-id", "probe2")),
                          timeout=10)
        assert [c for c in CALLS if c["trace_id"] == "probe2"]


async def test_importer_refuses_to_call_a_peer_below_its_threshold(tmp_path: Path) -> None:
    strict = "{minimumScore: 0.8, priorWeight: 2}"
    async with running_federation(tmp_path, importer_trust=strict) as federation:
        for _ in range(5):  # globex answered slower than its SLA five times
            federation.importer.trust.observe("globex", trust.PERFORMANCE, False, time.time())
        async with RuntimeClient(f"127.0.0.1:{federation.importer.local_port}") as client:
            with pytest.raises(CallError) as caught:
                await client.invoke("globex-translate", {"text": "x"}, trace_id="out1")
        assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert "below the trust threshold on performance" in caught.value.message
        (record,) = await refused_in_audit(federation.importer, "trust")
        assert record.direction == "outbound" and record.trace_id == "out1"
        assert not [r for r in await audit_of(federation.exporter)
                    if r.record.trace_id == "out1"]  # nothing was sent


async def test_tampered_audit_log_is_detected_by_verify(
        federation: Federation, capsys: pytest.CaptureFixture[str]) -> None:
    async with RuntimeClient(f"127.0.0.1:{federation.importer.local_port}") as client:
        for index in range(4):
            await client.invoke("globex-translate", {"text": str(index)})
    config = str(federation.configs["globex"])
    assert await asyncio.to_thread(main, ["audit", "verify", "--config", config]) == 0
    assert "chain intact" in capsys.readouterr().out
    database = federation.globex.directory / "state" / "federation.db"
    with sqlite3.connect(database) as db:
        (last,) = db.execute("SELECT MAX(seq) FROM pf_federation_audit").fetchone()
        assert last >= 5  # the four calls and the catalog acme read
        # An edit, and a deletion with records after it (a cut tail needs --head).
        db.execute("UPDATE pf_federation_audit SET price = 0 WHERE seq = 2")
        db.execute("DELETE FROM pf_federation_audit WHERE seq = ?", (last - 1,))
    # The real command, as an auditor runs it.
    tampered = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "packetflow.cli", "audit", "verify", "--config",
                         config], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert tampered.returncode == 1
    assert "record 2 was edited" in tampered.stderr
    assert f"record {last - 1} deleted" in tampered.stderr


async def test_certificate_and_bundle_rotation_under_load_fail_no_call(
        federation: Federation) -> None:
    failures: list[BaseException] = []
    done = 0
    stop = asyncio.Event()

    async def caller(client: RuntimeClient) -> None:
        nonlocal done
        while not stop.is_set():
            try:
                await client.invoke("globex-translate", {"text": "load"}, timeout=30)
                done += 1
            except CallError as exc:
                failures.append(exc)

    async def settle(gateway: Gateway, generation: int) -> None:
        await eventually(lambda: gateway.current() is not None
                         and gateway.watch.generation > generation, timeout=30,
                         what="a reload")
        settled = done
        await eventually(lambda: done >= settled + 20, timeout=30, what="calls to go on")

    async with RuntimeClient(f"127.0.0.1:{federation.importer.local_port}") as client:
        workers = [asyncio.ensure_future(caller(client)) for _ in range(4)]
        await eventually(lambda: done >= 20, timeout=30, what="calls under way")
        # 1. globex's server certificate (same authority).
        new_globex = federation.globex.leaf()
        generation = federation.exporter.watch.generation
        federation.globex.install(new_globex)
        await settle(federation.exporter, generation)
        # 2. acme's client certificate: a new channel, so a new handshake.
        new_acme = federation.acme.leaf()
        generation = federation.importer.watch.generation
        federation.acme.install(new_acme)
        await settle(federation.importer, generation)
        # 3. acme's authority: globex trusts old and new, acme moves, globex drops the old.
        old_authority = federation.acme.authority
        federation.acme.authority = new_authority("acme.example", "acme")
        generation = federation.exporter.watch.generation
        write_atomically(federation.acme.ca, old_authority.certificate_pem
                         + federation.acme.authority.certificate_pem)
        await settle(federation.exporter, generation)
        rotated = federation.acme.leaf()
        generation = federation.importer.watch.generation
        federation.acme.install(rotated)
        await settle(federation.importer, generation)
        generation = federation.exporter.watch.generation
        write_atomically(federation.acme.ca, federation.acme.authority.certificate_pem)
        await settle(federation.exporter, generation)
        stop.set()
        await asyncio.gather(*workers)
    assert failures == []
    assert done >= 100
    # New handshakes used the new material, both ways.
    served = {r.record.fingerprint for r in await audit_of(federation.exporter)
              if r.record.direction == "inbound" and r.record.code == "OK"}
    assert fingerprint(new_acme) in served and fingerprint(rotated) in served
    link = federation.importer.links["globex"]
    await eventually(lambda: link.fingerprint == fingerprint(new_globex), timeout=30,
                     what="acme to see globex's new certificate")
    assert x509.load_pem_x509_certificate(federation.globex.cert.read_bytes()) \
        == new_globex.certificate
