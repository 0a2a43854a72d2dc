"""Payload encoding: JSON bytes (orjson) vs ``google.protobuf.Struct`` for the same object.

Backs the choice recorded in ``proto/packetflow/v1/runtime.proto``: payloads travel as JSON
bytes. Each side does the full round trip a call needs: encode the object to wire bytes, then
decode them back into Python values. Both are timed in the same run, alternating, and each
figure is the median of several repeats.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import orjson
from google.protobuf import json_format, struct_pb2
from google.protobuf.internal import api_implementation

from bench.common import ratio_figures

REPEATS = 7
MIN_SECONDS = 0.2  # each timed batch runs at least this long, so timer resolution is no issue


def sample_object() -> dict[str, Any]:
    """About 1 KiB of JSON, shaped like a real capability input: mixed types, nesting."""
    return {
        "request_id": "9b2f6c1e-4a7d-4f0e-8c1b-2d3e4f5a6b7c",
        "user": {"id": 48213, "name": "Ada Lovelace", "email": "ada@example.com",
                 "roles": ["admin", "editor"], "active": True},
        "query": "summarise the open incidents for the payments service this week",
        "limit": 25,
        "offset": 0,
        "threshold": 0.75,
        "filters": [
            {"field": "severity", "op": "in", "values": ["high", "critical"]},
            {"field": "created_at", "op": "gte", "values": ["2024-05-01T00:00:00Z"]},
            {"field": "team", "op": "eq", "values": ["payments"]},
        ],
        "items": [
            {"sku": f"SKU-{n:05d}", "qty": n % 7 + 1, "price_cents": 1999 + 250 * n,
             "tags": ["sale", "new"] if n % 2 else ["stock"]}
            for n in range(6)
        ],
        "metadata": {"source": "bench", "version": 3, "trace": None,
                     "note": "lorem ipsum dolor sit amet, consectetur adipiscing elit"},
    }


def json_round_trip(value: dict[str, Any]) -> Any:
    """Encode to JSON bytes and decode back, as the runtime does for every call."""
    return orjson.loads(orjson.dumps(value))


def struct_round_trip(value: dict[str, Any]) -> Any:
    """The Struct equivalent: build, serialize, parse, convert back to Python values."""
    message = struct_pb2.Struct()
    message.update(value)
    wire = message.SerializeToString()
    parsed = struct_pb2.Struct()
    parsed.ParseFromString(wire)
    return json_format.MessageToDict(parsed)


def _time_per_call(fn: Callable[[dict[str, Any]], Any], value: dict[str, Any],
                   loops: int) -> float:
    started = time.perf_counter()
    for _ in range(loops):
        fn(value)
    return (time.perf_counter() - started) / loops


def _loops_for(fn: Callable[[dict[str, Any]], Any], value: dict[str, Any]) -> int:
    # Double the loop count until a batch lasts MIN_SECONDS (also warms the code up).
    loops = 1
    while _time_per_call(fn, value, loops) * loops < MIN_SECONDS:
        loops *= 2
    return loops


def run() -> dict[str, Any]:
    """Per-round-trip microseconds of both encodings, their ratio, and int fidelity."""
    value = sample_object()
    json_loops = _loops_for(json_round_trip, value)
    struct_loops = _loops_for(struct_round_trip, value)
    json_times: list[float] = []
    struct_times: list[float] = []
    for _ in range(REPEATS):  # alternate so drift of a shared machine hits both alike
        json_times.append(_time_per_call(json_round_trip, value, json_loops))
        struct_times.append(_time_per_call(struct_round_trip, value, struct_loops))
    json_s = statistics.median(json_times)
    struct_s = statistics.median(struct_times)
    pairs = [s / j for s, j in zip(struct_times, json_times, strict=True)]

    back = struct_round_trip(value)
    limit = back["limit"]
    return {
        "json_us": round(json_s * 1e6, 2),
        "struct_us": round(struct_s * 1e6, 2),
        **ratio_figures("struct_over_json", pairs),
        # Struct has only double numbers: 25 comes back as 25.0 and fails `type: integer`.
        "struct_preserves_int": type(limit) is int,
        "struct_int_comes_back_as": f"{type(limit).__name__} {limit!r}",
        "json_round_trip_equal": json_round_trip(value) == value,
        "json_bytes": len(orjson.dumps(value)),
        "struct_bytes": len(_struct_bytes(value)),
        "protobuf_backend": api_implementation.Type(),
    }


def _struct_bytes(value: dict[str, Any]) -> bytes:
    message = struct_pb2.Struct()
    message.update(value)
    return message.SerializeToString()
