"""gRPC keepalive: how a channel notices a peer that vanished without closing (a crashed host,
a dropped NAT entry, a half-open connection), and the ping rate our servers accept for it."""

from __future__ import annotations

from typing import Any

# A channel with calls in flight pings after this long without bytes from the peer, and drops
# the connection (its calls fail UNAVAILABLE, the next ones reconnect) when the ping goes
# unanswered: without it, a half-open connection swallows every later call until its deadline.
KEEPALIVE_TIME_MS = 10_000
KEEPALIVE_TIMEOUT_MS = 5_000

CHANNEL_KEEPALIVE: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    # Any ping (keepalive, or the flow-control probe already in flight when the peer went
    # away, which holds the keepalive ping back) unanswered this long ends the connection;
    # grpc's default is a minute.
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
]

# gRPC servers by default answer a ping more often than every 5 minutes during a call that
# sends nothing with GOAWAY (too_many_pings): ours accept the channels' rate above.
SERVER_KEEPALIVE: list[tuple[str, Any]] = [
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
]
