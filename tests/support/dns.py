"""A real DNS server on loopback answering SRV records, as Kubernetes DNS does for Services."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dnslib import QTYPE, RCODE, RR, SRV
from dnslib.server import BaseResolver, DNSLogger, DNSServer


class SrvRecords(BaseResolver):  # type: ignore[misc]
    """Answers ``name -> (target, port)`` SRV queries; every other name is NXDOMAIN."""

    def __init__(self, records: dict[str, tuple[str, int]]) -> None:
        self.records = {name.rstrip(".") + ".": value for name, value in records.items()}
        self.queries: list[str] = []

    def resolve(self, request: Any, handler: Any) -> Any:
        reply = request.reply()
        name = str(request.q.qname)
        self.queries.append(name)
        found = self.records.get(name)
        if request.q.qtype == QTYPE.SRV and found is not None:
            target, port = found
            reply.add_answer(RR(name, QTYPE.SRV, ttl=60,
                                rdata=SRV(priority=0, weight=10, port=port, target=target)))
        else:
            reply.header.rcode = RCODE.NXDOMAIN
        return reply


@contextmanager
def dns_server(records: dict[str, tuple[str, int]]) -> Iterator[tuple[SrvRecords, int]]:
    """Serve ``records`` over UDP on 127.0.0.1; yields the resolver and the port."""
    resolver = SrvRecords(records)
    quiet = DNSLogger("-request,-reply,-truncated,-error,-recv,-send,-data")
    server = DNSServer(resolver, port=0, address="127.0.0.1", logger=quiet)
    server.start_thread()
    try:
        yield resolver, server.server.server_address[1]
    finally:
        server.stop()
        server.server.server_close()
