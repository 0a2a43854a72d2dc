"""The gateway's plain-data parts: HPACK coding, gRPC framing and deadlines, request
headers, the routes file, and routes from Kubernetes objects."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import pytest
from hpack import Decoder, Encoder
from hpack.exceptions import HPACKError

from packetflow.gateway.grpcwire import (
    WireError,
    first_message,
    format_timeout,
    frame_message,
    parse_timeout,
    single_message,
    status_of,
    status_trailers,
    trailers_only,
)
from packetflow.gateway.h2 import HeaderDecoder, HeaderEncoder, _only_indexed
from packetflow.gateway.kube import routes_from, slice_addresses
from packetflow.gateway.proxy import read_headers
from packetflow.gateway.routes import RoutesError, load_routes, parse_routes

# ---------------------------------------------------------------------------- HPACK


def test_the_encoder_is_stateless_and_any_decoder_reads_it() -> None:
    encoder = HeaderEncoder()
    headers = [(b":method", b"POST"), (b":status", b"200"), (b"content-type", b"application/grpc"),
               (b"packetflow-trace-id", b"t" * 300), (b"x-custom", b""), (b"te", b"trailers")]
    first = encoder.encode(headers)
    assert first[0] == 0x20  # the block starts by setting our dynamic table size to 0
    assert [tuple(h) for h in Decoder().decode(first, raw=True)] == headers
    second = encoder.encode(headers)
    assert second == first[1:]  # same fields, same bytes: nothing was indexed
    encoder.table_size_changed()  # the peer's SETTINGS_HEADER_TABLE_SIZE: announced again
    assert encoder.encode(headers)[0] == 0x20


def test_the_decoder_reuses_only_blocks_that_cannot_have_changed() -> None:
    peer = Encoder()
    decoder = HeaderDecoder()
    fields = [(b":status", b"200"), (b"grpc-status", b"0")]
    literal = peer.encode(fields)  # grpc-status: 0 is new: a literal added to the tables
    assert not _only_indexed(literal)
    assert decoder.decode(literal) == fields
    indexed = peer.encode(fields)  # both fields are indexed now
    assert _only_indexed(indexed)
    assert decoder.decode(indexed) == fields
    assert decoder.decode(indexed) == fields  # answered from the cache
    # An insertion shifts the dynamic indexes: the same bytes now mean the newest entry.
    decoder.decode(peer.encode([(b"grpc-status", b"5")]))
    assert decoder.decode(indexed) == [(b":status", b"200"), (b"grpc-status", b"5")]
    assert _only_indexed(bytes([0xFF, 0x80, 0x01]))  # an index past 127: several bytes
    assert not _only_indexed(bytes([0x20]))  # a table size update


def test_blocks_that_cannot_change_the_table_are_read_in_one_pass() -> None:
    peer = Encoder()
    decoder = HeaderDecoder()
    fields = [(b":status", b"200"), (b"grpc-status", b"0")]
    assert decoder.decode(peer.encode(fields)) == fields  # grpc-status: 0 enters the tables
    ours = HeaderEncoder()
    ours.encode([])  # past the table size announcement
    per_call = [(b":path", b"/packetflow.v1.Federation/Invoke"),
                (b"packetflow-trace-id", b"t" * 200), (b"x-new-name", b"v" * 130)]
    block = ours.encode(per_call)
    assert block[0] & 0xF0 == 0x00  # literals without indexing: nothing to learn
    assert decoder.decode(block) == per_call
    # The table is as the peer's encoder knows it: its indexed block still reads right.
    assert decoder.decode(peer.encode(fields)) == fields
    mixed = peer.encode(fields) + block
    assert decoder.decode(mixed) == fields + per_call
    # Huffman-coded strings are hpack's to read, and read the same.
    huffman = Encoder().encode([(b"x-new-name", b"some value")], huffman=True)
    assert HeaderDecoder().decode(huffman) == [(b"x-new-name", b"some value")]
    with pytest.raises(HPACKError):  # a truncated block is still refused
        HeaderDecoder().decode(block[:-10])


# ---------------------------------------------------------------------------- gRPC framing


def test_deadlines_round_trip_within_the_eight_digit_limit() -> None:
    assert parse_timeout(b"5S") == 5.0 and parse_timeout(b"250m") == 0.25
    assert parse_timeout(b"1H") == 3600.0 and parse_timeout(b"x") is None
    assert parse_timeout(None) is None and parse_timeout(b"10q") is None
    for seconds in (0.000_5, 1.5, 99.0, 3600.0, 40 * 86400.0):
        encoded = format_timeout(seconds)
        assert len(encoded) <= 9
        assert parse_timeout(encoded) == pytest.approx(seconds, rel=1e-3, abs=1e-6)


def test_messages_are_read_not_rewritten() -> None:
    payload = b"\x0a\x04echo"
    assert single_message(frame_message(payload), None) == payload
    compressed = b"\x01" + len(gz := gzip.compress(payload)).to_bytes(4, "big") + gz
    assert single_message(compressed, b"gzip") == payload
    with pytest.raises(WireError, match="'snappy' is not supported"):
        single_message(b"\x01" + len(payload).to_bytes(4, "big") + payload, b"snappy")
    with pytest.raises(WireError, match="exactly one message"):
        single_message(frame_message(payload) + frame_message(payload), None)
    assert first_message(frame_message(payload)[:6]) is None
    assert first_message(frame_message(payload) + b"\x00\x00") == payload


def test_statuses_are_percent_encoded_and_read_back() -> None:
    trailers = status_trailers(14, "no ready endpoint: 100% ejected",
                               [(b"packetflow-trace-id", b"abc")])
    assert status_of(trailers) == (14, "no ready endpoint: 100% ejected")
    # Printable ASCII stays as it is, but for '%'; everything else is percent-encoded.
    assert (b"grpc-message", b"no ready endpoint: 100%25 ejected") in trailers
    assert status_trailers(2, "\u00e9\n")[1] == (b"grpc-message", b"%C3%A9%0A")
    assert trailers_only(5, "x")[:2] == [(b":status", b"200"),
                                         (b"content-type", b"application/grpc")]
    assert status_of([]) == (2, "the response carried no grpc-status")


def test_request_headers_carry_the_trace_and_the_remaining_deadline() -> None:
    headers = [(b":path", b"/packetflow.v1.CapabilityRuntime/Invoke"), (b":authority", b"gw"),
               (b"grpc-timeout", b"2S"), (b"packetflow-session", b"s1"),
               (b"packetflow-idempotency-key", b"k"), (b"content-type", b"application/grpc")]
    call = read_headers(headers, now=100.0)
    assert call.deadline == 102.0 and call.session == b"s1" and call.idempotency_key
    assert (b"packetflow-trace-id", call.trace_id.encode()) in call.forward  # minted once
    upstream = call.upstream_headers(b"10.0.0.1:50051", now=101.5)
    assert upstream[:4] == [(b":method", b"POST"), (b":scheme", b"http"),
                            (b":path", b"/packetflow.v1.CapabilityRuntime/Invoke"),
                            (b":authority", b"10.0.0.1:50051")]
    assert upstream[-1] == (b"grpc-timeout", b"500000u")
    assert not any(name == b"grpc-timeout" for name, _ in call.forward)
    w3c = read_headers([(b"traceparent", b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01")], 0.0)
    assert w3c.trace_id == "a" * 32 and not any(n == b"packetflow-trace-id"
                                                for n, _ in w3c.forward)


# ---------------------------------------------------------------------------- routes file


def test_routes_file_forms() -> None:
    routes = parse_routes("""
capabilities:
  echo: [127.0.0.1:1, "[::1]:2", unix:/tmp/x.sock]
  greet:
    backends: [h:3]
    canary: {backends: [h:4], weight: 25}
    traffic: {hedging: {enabled: false}, retries: {maxAttempts: 2}}
    identity: team-a/packetflow-greet
actors:
  ledger: {members: {m1: h:5, m2: h:6}, identity: "spiffe://c.test/ns/a/sa/packetflow-l"}
  solo: {members: [h:7]}
""", "routes.yaml")
    assert routes.capabilities["echo"].stable == ("127.0.0.1:1", "[::1]:2", "unix:/tmp/x.sock")
    greet = routes.capabilities["greet"]
    assert (greet.canary, greet.weight, greet.effects) == (("h:4",), 25, None)
    assert not greet.traffic.hedging.enabled and greet.traffic.retries.max_attempts == 2
    assert routes.actors["ledger"].members == (("m1", "h:5"), ("m2", "h:6"))
    assert routes.actors["solo"].members == (("h:7", "h:7"),)
    assert (greet.identity, routes.capabilities["echo"].identity) == \
        ("team-a/packetflow-greet", None)
    assert routes.actors["ledger"].identity == "spiffe://c.test/ns/a/sa/packetflow-l"
    assert parse_routes("", "empty.yaml").capabilities == {}


def test_routes_file_errors_name_file_line_and_field(tmp_path: Path) -> None:
    with pytest.raises(RoutesError) as bad:
        parse_routes("capabilities:\n  echo: [nowhere]\n  greet:\n    canary: {weight: 101}\n"
                     "actors:\n  echo: {members: [h:1]}\n", "r.yaml")
    messages = [str(e) for e in bad.value.errors]
    assert "r.yaml:2: capabilities.echo[0]: 'nowhere' is not host:port, [v6]:port " \
           "or unix:PATH" in messages  # the short form's own path
    assert any(m.startswith("r.yaml:4: capabilities.greet.canary.weight:") for m in messages)
    with pytest.raises(RoutesError) as bad:
        parse_routes("capabilities:\n  echo:\n    backends: [h:1]\n    identity: alice\n",
                     "r.yaml")
    assert str(bad.value.errors[0]).startswith(
        "r.yaml:4: capabilities.echo.identity: 'alice' is not namespace/service-account")
    with pytest.raises(RoutesError, match="a name is a capability or an actor type"):
        parse_routes("capabilities: {echo: [h:1]}\nactors: {echo: {members: [h:2]}}", "r.yaml")
    with pytest.raises(RoutesError, match=r"r.yaml:1: invalid YAML"):
        parse_routes("capabilities: [", "r.yaml")
    with pytest.raises(RoutesError, match="a routes file is a mapping"):
        parse_routes("- echo", "r.yaml")
    with pytest.raises(RoutesError, match="cannot read"):
        load_routes(tmp_path / "missing.yaml")


# ---------------------------------------------------------------------------- Kubernetes


def cap(name: str, namespace: str = "ns", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "packetflow.io/v1alpha1", "kind": "Capability",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"intent": "i", "implementation": {"builtin": {"name": "echo"}}, **spec}}


def endpoint_slice(service: str, endpoints: list[dict[str, Any]],
                   ports: list[dict[str, Any]] | None = None,
                   namespace: str = "ns") -> dict[str, Any]:
    return {"metadata": {"name": f"{service}-x", "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": service}},
            "endpoints": endpoints,
            "ports": ports if ports is not None else [{"name": "grpc", "port": 50051},
                                                      {"name": "metrics", "port": 9464}]}


def test_slice_addresses_take_ready_endpoints_on_the_grpc_port() -> None:
    slices = [endpoint_slice("a", [
        {"addresses": ["10.0.0.1"], "targetRef": {"name": "a-1"}},
        {"addresses": ["10.0.0.2"], "conditions": {"ready": False}},
        {"addresses": ["fd00::3"], "conditions": {"ready": True}, "targetRef": {"name": "a-3"}},
        {"addresses": []}])]
    assert slice_addresses(slices) == [("a-1", "10.0.0.1:50051"), ("a-3", "[fd00::3]:50051")]
    single = [endpoint_slice("b", [{"addresses": ["10.0.0.4"]}], [{"port": 7000}])]
    assert slice_addresses(single) == [("10.0.0.4:7000", "10.0.0.4:7000")]
    assert slice_addresses([endpoint_slice("c", [{"addresses": ["10.0.0.5"]}], [])]) == []


def test_routes_from_cluster_objects() -> None:
    capabilities = {("ns", "echo"): cap("echo", effects=["network"], canary={"weight": 30}),
                    ("ns", "plain"): cap("plain"),
                    ("ns", "broken"): {"metadata": {"name": "broken"}, "spec": {}}}
    slices = {("ns", "e1"): endpoint_slice("echo", [{"addresses": ["10.0.0.1"]}]),
              ("ns", "e2"): endpoint_slice("echo-canary", [{"addresses": ["10.0.0.2"]}]),
              ("ns", "p1"): endpoint_slice("plain-canary", [{"addresses": ["10.0.0.9"]}]),
              ("other", "e3"): endpoint_slice("echo", [{"addresses": ["10.9.9.9"]}], None,
                                              "other")}
    routes = routes_from(capabilities, {}, slices)
    echo = routes.capabilities["echo"]
    assert (echo.stable, echo.canary, echo.weight) == (("10.0.0.1:50051",),
                                                        ("10.0.0.2:50051",), 30)
    assert echo.effects == ("network",) and echo.implementation == "builtin"
    # Under mutual TLS its backends must be the workload the operator runs it as.
    assert echo.identity == "ns/packetflow-echo"
    # A leftover canary workload without spec.canary gets no calls; a broken spec no route.
    assert routes.capabilities["plain"].canary == ()
    assert "broken" not in routes.capabilities
    clash = routes_from({**capabilities, ("other", "echo"): cap("echo", "other")}, {}, slices)
    assert "echo" not in clash.capabilities and "ns, other" in clash.problems["echo"]
