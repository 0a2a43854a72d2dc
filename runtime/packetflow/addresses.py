"""Listen and dial addresses as PacketFlow writes them: ``host:port``, ``[v6]:port``."""

from __future__ import annotations


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``) -> (host, port)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"address {address!r} is not host:port")
    return host.strip("[]"), int(port)
