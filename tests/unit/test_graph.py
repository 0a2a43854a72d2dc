"""The mesh picture: dependencies read from manifests, DOT checked by real Graphviz, Mermaid,
and live figures computed from a real runtime's metrics."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client import generate_latest

from packetflow.context import CallContext
from packetflow.engine import Engine
from packetflow.errors import PacketFlowError
from packetflow.graph import (
    Dependency,
    Stats,
    _quantile,
    dependencies_of,
    mesh_of,
    observed_dependencies,
    parse_totals,
    render_dot,
    render_mermaid,
    stats_between,
)
from packetflow.manifests import load_text
from packetflow.spec import Actor, Capability
from tests.support.manifests import sample_capabilities

MANIFESTS = """
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: fetch}
spec:
  intent: Fetch
  implementation: {builtin: {name: echo}}
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: flow}
spec:
  intent: A composition with every kind of edge
  implementation:
    composition:
      steps:
        - {name: first, call: {capability: fetch}}
        - parallel:
            branches:
              a: {call: {capability: fetch}}
              b: {call: {capability: remote-thing, address: "10.0.0.9:50051"}}
        - mapReduce: {over: input.xs, map: {call: {capability: fetch}},
                      reduce: {capability: fetch}}
      triggers:
        - completed: {capability: fetch, outcome: failure}
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: wiki}
spec:
  intent: A remote MCP tool
  implementation: {mcp: {url: "https://wiki.example.com/mcp", tool: search}}
---
apiVersion: packetflow.io/v1alpha1
kind: Actor
metadata: {name: helper}
spec:
  intent: Uses tools
  implementation: {python: {module: tests.support.actor_handlers}}
  mcpTools:
    - {name: get, capability: fetch}
    - {name: search, url: "https://wiki.example.com/mcp", tool: find}
"""


def loaded() -> tuple[list[Capability], list[Actor]]:
    result = load_text(MANIFESTS, "graph.yaml")
    assert result.errors == []
    return result.capabilities, result.actors


def test_dependencies_name_every_declared_edge_once() -> None:
    capabilities, actors = loaded()
    flow = next(c for c in capabilities if c.name == "flow")
    assert dependencies_of(flow) == [
        Dependency("fetch", "step", "first"),
        Dependency("fetch", "step"),
        Dependency("remote-thing @ 10.0.0.9:50051", "step", external=True),
        Dependency("fetch", "reduce"),
        Dependency("fetch", "trigger", "on failure"),
    ]
    wiki = next(c for c in capabilities if c.name == "wiki")
    assert dependencies_of(wiki) == [
        Dependency("https://wiki.example.com/mcp", "mcp", "search", external=True)]
    assert dependencies_of(actors[0]) == [
        Dependency("fetch", "tool", "get"),
        Dependency("https://wiki.example.com/mcp", "mcp", "find", external=True)]
    observed = observed_dependencies(actors[0], {"wiki", "fetch"})
    assert observed[-2:] == [Dependency("fetch", "call"), Dependency("wiki", "call")]
    assert Dependency.from_json(observed[0].to_json()) == observed[0]


def test_mesh_draws_external_endpoints_once() -> None:
    mesh = mesh_of(*loaded())
    kinds = {name: node.kind for name, node in mesh.nodes.items()}
    assert kinds == {"fetch": "builtin", "flow": "composition", "wiki": "mcp",
                     "helper": "actor", "remote-thing @ 10.0.0.9:50051": "external",
                     "https://wiki.example.com/mcp": "external"}
    assert ("helper", Dependency("fetch", "tool", "get")) in mesh.edges()


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz (Debian graphviz) missing")
def test_dot_is_valid_graphviz_with_figures() -> None:
    mesh = mesh_of(*loaded())
    stats = {"fetch": Stats(12.5, 0.2, 38.0), "flow": Stats(1.0, 0.0, None)}
    dot = render_dot(mesh, stats)
    assert '"fetch" [shape=box, label="fetch\\nbuiltin\\n12.5/s, 20.0% errors, p99 38 ms", ' \
        'fillcolor="#ef9a9a"];' in dot
    assert '"flow" -> "fetch" [label="trigger on failure", style=dashed];' in dot
    svg = subprocess.run(["dot", "-Tsvg"], input=dot, capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert svg.lstrip().startswith("<?xml") and "12.5/s, 20.0% errors" in svg


def test_mermaid_has_shapes_edges_and_styles_only_with_figures() -> None:
    mesh = mesh_of(*loaded())
    plain = render_mermaid(mesh)
    assert plain.startswith("flowchart LR\n")
    assert '(["helper<br/>actor"])' in plain
    assert "-.->|trigger on failure|" in plain
    styled = [line for line in plain.splitlines() if "style" in line]
    assert len(styled) == 2  # only the two external endpoints
    with_stats = render_mermaid(mesh, {"fetch": Stats(3.0, 0.02, 5.0)})
    assert "fetch<br/>builtin<br/>3/s, 2.0% errors, p99 5 ms" in with_stats
    assert "fill:#ffe082" in with_stats  # amber: between 1% and 5% errors


async def test_stats_from_a_real_runtimes_metrics() -> None:
    engine = Engine(sample_capabilities())
    try:
        before = parse_totals(generate_latest(engine.metrics.registry).decode())
        for n in range(9):
            await engine.invoke("add", {"a": n, "b": 1}, CallContext("add", "t"))
        with pytest.raises(PacketFlowError):
            await engine.invoke("add", {"a": "x"}, CallContext("add", "t"))
        after = parse_totals(generate_latest(engine.metrics.registry).decode())
    finally:
        await engine.aclose()
    stats = stats_between(before, after, 2.0)
    add = stats["add"]
    assert add.calls_per_s == pytest.approx(5.0)
    assert add.error_share == pytest.approx(0.1)
    assert add.p99_ms is not None and 0 < add.p99_ms < 1000
    assert stats["echo"].calls_per_s == 0 and stats["echo"].health == "idle"


def test_quantile_interpolates_within_the_bucket_as_promql_does() -> None:
    buckets = [(0.01, 50.0), (0.1, 100.0), (float("inf"), 100.0)]
    assert _quantile(0.5, buckets) == pytest.approx(10.0)  # exactly the first bound
    assert _quantile(0.99, buckets) == pytest.approx((0.01 + 0.09 * 49 / 50) * 1e3)
    assert _quantile(0.99, [(0.1, 0.0), (float("inf"), 0.0)]) is None
    assert _quantile(0.99, [(0.1, 1.0), (float("inf"), 100.0)]) == pytest.approx(100.0)
