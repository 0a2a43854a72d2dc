"""A picture of the mesh: capabilities, actor types and what they call, as DOT or Mermaid.

Pure data in and text out: ``dependencies_of`` reads what a manifest declares (composition
steps, reducers, completion triggers, MCP tools and servers), ``render_dot`` and
``render_mermaid`` draw a :class:`Mesh`, optionally labelled and coloured with live
:class:`Stats` per capability (call rate, error share, p99).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from packetflow.composition.model import COMPOSITION_PATH, ReduceCall, iter_steps
from packetflow.spec import Actor, Capability, Federation

ERROR_SHARE_WARN = 0.01  # amber above 1% errors
ERROR_SHARE_BAD = 0.05  # red above 5%
COLOURS = {"idle": "#eeeeee", "ok": "#c8e6c9", "warn": "#ffe082", "bad": "#ef9a9a",
           "external": "#ffffff"}


@dataclass(frozen=True)
class Dependency:
    """An edge: ``kind`` is step, reduce, trigger, tool, call, mcp or federated; ``target`` a
    capability or actor name, or (``external``) an address, a URL or another organization's
    capability outside this runtime."""

    target: str
    kind: str
    label: str = ""
    external: bool = False

    def to_json(self) -> dict[str, Any]:
        """As the Describe RPCs carry it."""
        return {"target": self.target, "kind": self.kind, "label": self.label,
                "external": self.external}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Dependency:
        """From the Describe RPCs' JSON."""
        return cls(str(data["target"]), str(data["kind"]), str(data.get("label", "")),
                   bool(data.get("external", False)))


@dataclass(frozen=True)
class Node:
    """A capability (``kind`` its implementation), an actor type (``actor``) or an external
    endpoint (``external``)."""

    name: str
    kind: str
    dependencies: tuple[Dependency, ...] = ()


@dataclass(frozen=True)
class Stats:
    """Live figures of one capability over a window."""

    calls_per_s: float
    error_share: float
    p99_ms: float | None

    @property
    def health(self) -> str:
        """idle, ok, warn or bad, from the call rate and the error share."""
        if self.calls_per_s <= 0:
            return "idle"
        if self.error_share > ERROR_SHARE_BAD:
            return "bad"
        return "warn" if self.error_share > ERROR_SHARE_WARN else "ok"

    def label(self) -> str:
        """``12.5/s, 0.4% errors, p99 38 ms``."""
        p99 = f", p99 {self.p99_ms:.0f} ms" if self.p99_ms is not None else ""
        return f"{self.calls_per_s:.3g}/s, {self.error_share:.1%} errors{p99}"


@dataclass
class Mesh:
    """Nodes by name; external endpoints appear as nodes of kind ``external``."""

    nodes: dict[str, Node] = field(default_factory=dict)

    def add(self, node: Node) -> None:
        """Add a node and the external endpoints its dependencies name."""
        self.nodes[node.name] = node
        for dep in node.dependencies:
            if dep.external and dep.target not in self.nodes:
                self.nodes[dep.target] = Node(dep.target, "external")

    def edges(self) -> list[tuple[str, Dependency]]:
        """(source, dependency) for every dependency whose target is drawn."""
        return [(node.name, dep) for node in self.nodes.values() for dep in node.dependencies
                if dep.target in self.nodes]


def dependencies_of(manifest: Capability | Actor) -> list[Dependency]:
    """What a manifest declares it calls, in manifest order, without repeats."""
    found: list[Dependency] = []
    if isinstance(manifest, Actor):
        for tool in manifest.spec.mcp_tools:
            if tool.capability is not None:
                found.append(Dependency(tool.capability, "tool", tool.name))
            else:
                found.append(Dependency(str(tool.url), "mcp", tool.tool or tool.name,
                                        external=True))
        return _unique(found)
    implementation = manifest.spec.implementation
    if implementation.mcp is not None:
        found.append(Dependency(implementation.mcp.url, "mcp", implementation.mcp.tool,
                                external=True))
    if implementation.federated is not None:
        found.append(federated(implementation.federated.peer,
                               implementation.federated.capability))
    composition = implementation.composition
    if composition is None:
        return found
    for _, step in iter_steps(composition.steps, f"{COMPOSITION_PATH}.steps"):
        if step.call is not None:
            found.append(_call(step.call.capability, step.call.address, "step",
                               step.name or ""))
        if step.map_reduce is not None and isinstance(step.map_reduce.reduce, ReduceCall):
            reduce = step.map_reduce.reduce
            found.append(_call(reduce.capability, reduce.address, "reduce", step.name or ""))
    for trigger in composition.triggers:
        if trigger.completed is not None:
            found.append(Dependency(trigger.completed.capability, "trigger",
                                    f"on {trigger.completed.outcome}"))
    return _unique(found)


def observed_dependencies(actor: Actor, called: Iterable[str]) -> list[Dependency]:
    """An actor type's declared dependencies plus the capabilities its ``ctx.call`` reached
    (``call`` edges: undeclared, so known only once they happen)."""
    declared = dependencies_of(actor)
    return _unique([*declared, *(Dependency(name, "call") for name in sorted(called))])


def federated(peer: str, capability: str, label: str = "") -> Dependency:
    """An edge to another organization's capability (an import)."""
    return Dependency(f"{capability} @ {peer}", "federated", label or peer, external=True)


def _call(capability: str, address: str | None, kind: str, label: str) -> Dependency:
    if address is None:
        return Dependency(capability, kind, label)
    return Dependency(f"{capability} @ {address}", kind, label, external=True)


def _unique(dependencies: Iterable[Dependency]) -> list[Dependency]:
    return list(dict.fromkeys(dependencies))


def mesh_of(capabilities: Iterable[Capability], actors: Iterable[Actor],
            federations: Iterable[Federation] = ()) -> Mesh:
    """The mesh that a set of manifests declares; a Federation adds its imports (local
    names calling another organization's capability) and its peers (calling our exports)."""
    mesh = Mesh()
    for capability in capabilities:
        mesh.add(Node(capability.name, capability.spec.implementation.kind,
                      tuple(dependencies_of(capability))))
    for actor in actors:
        mesh.add(Node(actor.name, "actor", tuple(dependencies_of(actor))))
    for federation in federations:
        for imported in federation.spec.imports:
            mesh.add(Node(imported.local_name, "federated",
                          (federated(imported.peer, imported.capability, "import"),)))
        for peer in federation.spec.peers:
            exported = tuple(Dependency(export.capability, "federated", "export")
                             for export in federation.spec.exports if peer.name in export.to)
            if exported:
                mesh.add(Node(f"peer {peer.name}", "peer", exported))
    return mesh


def _colour(node: Node, stats: Mapping[str, Stats]) -> str:
    if node.kind in ("external", "peer"):
        return COLOURS["external"]
    found = stats.get(node.name)
    return COLOURS[found.health] if found is not None else COLOURS["idle"]


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _dot_label(*lines: str) -> str:
    """A quoted DOT label of several lines (``\\n`` separates them)."""
    return _quote("\n".join(lines)).replace("\n", "\\n")


_DOT_SHAPES = {"actor": "ellipse", "external": "note", "peer": "house"}


def render_dot(mesh: Mesh, stats: Mapping[str, Stats] | None = None) -> str:
    """Graphviz DOT: boxes for capabilities, ellipses for actor types, notes for external
    endpoints; edges labelled with their kind; filled by health when ``stats`` are given."""
    stats = stats or {}
    lines = ["digraph packetflow {", "  rankdir=LR;",
             '  node [fontname="Helvetica", fontsize=11, style=filled];',
             '  edge [fontname="Helvetica", fontsize=9];']
    for node in mesh.nodes.values():
        text = [node.name, node.kind]
        if node.name in stats:
            text.append(stats[node.name].label())
        lines.append(f"  {_quote(node.name)} [shape={_DOT_SHAPES.get(node.kind, 'box')}, "
                     f"label={_dot_label(*text)}, "
                     f"fillcolor={_quote(_colour(node, stats))}];")
    for source, dep in mesh.edges():
        label = f"{dep.kind} {dep.label}".strip()
        style = ", style=dashed" if dep.kind == "trigger" else ""
        lines.append(f"  {_quote(source)} -> {_quote(dep.target)} [label={_quote(label)}"
                     f"{style}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


_MERMAID_SHAPES = {"actor": ("([", "])"), "external": ("[/", "/]"), "peer": ("{{", "}}")}


def render_mermaid(mesh: Mesh, stats: Mapping[str, Stats] | None = None) -> str:
    """A Mermaid flowchart of the same picture (renders on GitHub and in most docs tools)."""
    stats = stats or {}
    ids = {name: f"n{index}" for index, name in enumerate(mesh.nodes)}
    lines = ["flowchart LR"]
    for node in mesh.nodes.values():
        text = f"{node.name}<br/>{node.kind}"
        if node.name in stats:
            text += f"<br/>{stats[node.name].label()}"
        start, end = _MERMAID_SHAPES.get(node.kind, ("[", "]"))
        lines.append(f'  {ids[node.name]}{start}"{text.replace(chr(34), "#quot;")}"{end}')
    for source, dep in mesh.edges():
        label = f"{dep.kind} {dep.label}".strip()
        arrow = "-.->" if dep.kind == "trigger" else "-->"
        lines.append(f"  {ids[source]} {arrow}|{label}| {ids[dep.target]}")
    for node in mesh.nodes.values():
        if stats or node.kind in ("external", "peer"):  # else Mermaid's theme decides
            lines.append(f"  style {ids[node.name]} fill:{_colour(node, stats)}")
    return "\n".join(lines) + "\n"


@dataclass
class Totals:
    """One capability's counters at one scrape: calls by code and the latency histogram."""

    calls: dict[str, float] = field(default_factory=dict)
    buckets: dict[float, float] = field(default_factory=dict)  # upper bound -> cumulative


def parse_totals(exposition: str) -> dict[str, Totals]:
    """A runtime's ``/metrics`` text -> per-capability counters (what ``stats_between`` needs)."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, Totals] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            capability = sample.labels.get("capability")
            if capability is None:
                continue
            entry = totals.setdefault(capability, Totals())
            if sample.name == "packetflow_capability_calls_total":
                code = sample.labels.get("code", "")
                entry.calls[code] = entry.calls.get(code, 0.0) + sample.value
            elif sample.name == "packetflow_capability_call_duration_seconds_bucket":
                entry.buckets[float(sample.labels["le"])] = sample.value
    return totals


def stats_between(before: Mapping[str, Totals], after: Mapping[str, Totals],
                  seconds: float) -> dict[str, Stats]:
    """Rates over the window between two scrapes: calls/s, error share, p99 (interpolated
    within the bucket, as PromQL's ``histogram_quantile`` does)."""
    stats: dict[str, Stats] = {}
    for name, now in after.items():
        then = before.get(name, Totals())
        delta = {code: count - then.calls.get(code, 0.0) for code, count in now.calls.items()}
        calls = sum(delta.values())
        errors = calls - delta.get("OK", 0.0)
        buckets = sorted((bound, count - then.buckets.get(bound, 0.0))
                         for bound, count in now.buckets.items())
        stats[name] = Stats(calls_per_s=calls / seconds if seconds > 0 else 0.0,
                            error_share=errors / calls if calls else 0.0,
                            p99_ms=_quantile(0.99, buckets))
    return stats


def _quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """``histogram_quantile`` over (upper bound, cumulative count) pairs, in milliseconds."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound * 1e3  # the highest finite bound, as Prometheus does
            share = (rank - lower_count) / (count - lower_count) if count > lower_count else 1
            return (lower_bound + (bound - lower_bound) * share) * 1e3
        lower_bound, lower_count = bound, count
    return None
