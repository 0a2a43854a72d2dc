"""The audit log on its durable stores: SQLite across a restart, and one PostgreSQL log that
two gateway replicas append to at once, still one linear, verifiable chain."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from packetflow.federation.audit import AuditRecord, verify
from packetflow.federation.store import FederationStore
from packetflow.spec import AuditPolicy

pytest_plugins = ["tests.support.postgres"]


def record(peer: str, index: int) -> AuditRecord:
    return AuditRecord(at=time.time(), direction="inbound", peer=peer, fingerprint="f" * 64,
                       capability="translate", decision="allow", reason="exported",
                       code="OK", duration_ms=1.5, bytes_in=10 + index, price=0.002,
                       currency="USD")


async def test_sqlite_log_survives_a_restart_and_prunes_to_an_anchor(tmp_path: Path) -> None:
    store = await FederationStore.open(AuditPolicy(), tmp_path)
    await asyncio.gather(*(store.append(record("globex", i)) for i in range(20)))
    await store.aclose()
    reopened = await FederationStore.open(AuditPolicy(), tmp_path)
    try:
        assert reopened.head is not None and reopened.head.seq == 20
        await reopened.append(record("globex", 20))
        assert verify(await reopened.read(), await reopened.anchor()) == []
        pruned = await reopened.prune(time.time() + 1)
        assert pruned == 21 and await reopened.read() == []
        await reopened.append(record("globex", 21))
        rows = await reopened.read()
        assert [r.seq for r in rows] == [22]
        assert verify(rows, await reopened.anchor()) == []
    finally:
        await reopened.aclose()


async def test_two_replicas_share_one_postgresql_chain(postgres_dsn: str,
                                                       tmp_path: Path) -> None:
    policy = AuditPolicy.model_validate({"store": {"postgresql": {"dsn": "set by env"}}})
    first = await FederationStore.open(policy, tmp_path, postgres_dsn)
    second = await FederationStore.open(policy, tmp_path, postgres_dsn)
    try:
        await asyncio.gather(*(store.append(record(store_name, i))
                               for i in range(30)
                               for store, store_name in ((first, "a"), (second, "b"))))
        rows = await first.read()
        assert [r.seq for r in rows] == list(range(1, 61))
        assert verify(rows, await first.anchor()) == []
        usage = await second.usage(0, time.time() + 1)
        assert {(u.peer, u.calls) for u in usage} == {("a", 30), ("b", 30)}
        assert abs(sum(u.metered for u in usage) - 60 * 0.002) < 1e-9
    finally:
        await first.aclose()
        await second.aclose()
