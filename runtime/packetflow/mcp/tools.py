"""What the MCP server offers: tools and resources, contributed by pluggable *tool sources*.

A ``ToolSource`` turns one kind of runtime object into MCP tools and resources. Capabilities
are one source (``CapabilitySource``, here); actor types are another (``ActorSource`` in
``packetflow.mcp.actors``: one tool per actor type taking ``actor_id`` plus the message
contract, and ``actor://{type}/{id}`` resources). Sources are registered with
``McpService.add_source``; the server treats them all alike.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from prometheus_client import CollectorRegistry

from packetflow.context import CallContext
from packetflow.contracts import contract_schema
from packetflow.engine import Engine, ServedCapability
from packetflow.errors import Code
from packetflow.spec import MCP_TOOL_NAME_PATTERN, Contract

ToolRunner = Callable[[dict[str, Any], CallContext], Awaitable[dict[str, Any]]]

# A `tools/call` may carry this key in its `_meta`: an actor applies a message id once, so a
# client retrying a call it saw fail (say, a dropped connection) cannot apply it twice. The
# server copies it into the CallContext's metadata.
MESSAGE_ID_META = "io.packetflow/message-id"
"""Runs one tool call through the engine: validated arguments in, output object out."""

_TOOL_NAME_RE = re.compile(MCP_TOOL_NAME_PATTERN)
_INVALID_CHARS_RE = re.compile(r"[^A-Za-z0-9_.-]")
MAX_TOOL_NAME = 128
REGISTRY_URI = "capability://registry"
CAPABILITY_URI_TEMPLATE = "capability://{name}"
CAPABILITY_URI_PREFIX = "capability://"
JSON_MIME = "application/json"


@dataclass(frozen=True)
class ToolEntry:
    """One MCP tool: its wire description and how a call runs."""

    name: str
    description: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any] | None
    target: str  # the capability (or actor type) the tool runs; the CallContext's name
    run: ToolRunner
    title: str | None = None


@dataclass(frozen=True)
class ResourceEntry:
    """A concrete resource a source lists (``resources/list``)."""

    uri: str
    name: str
    description: str
    mime_type: str = JSON_MIME


@dataclass(frozen=True)
class TemplateEntry:
    """A URI template a source can read (``resources/templates/list``)."""

    uri_template: str
    name: str
    description: str
    mime_type: str = JSON_MIME


@dataclass(frozen=True)
class NamedTool:
    """A tool a source wants to offer, before names are made unique across sources."""

    wanted_name: str
    explicit: bool  # the manifest chose the name (``spec.mcp.name``): it wins a collision
    build: Callable[[str], ToolEntry]


class ToolSource(Protocol):
    """Contributes tools and resources to the MCP server (capabilities, actor types)."""

    def version(self) -> object:
        """Anything that changes when the set of tools changes (cheap; checked per call)."""
        ...

    def tools(self) -> Iterable[NamedTool]:
        """The tools this source offers now."""
        ...

    def resources(self) -> Iterable[ResourceEntry]:
        """Concrete resources to list."""
        ...

    def templates(self) -> Iterable[TemplateEntry]:
        """Resource templates to list."""
        ...

    async def read(self, uri: str) -> str | None:
        """The JSON text of ``uri``, or ``None`` when the URI is not this source's (or names
        nothing that exists)."""
        ...


def sanitize_tool_name(name: str) -> str:
    """A valid MCP tool name (``[A-Za-z0-9_.-]{1,128}``) derived from any name."""
    cleaned = _INVALID_CHARS_RE.sub("_", name)[:MAX_TOOL_NAME]
    return cleaned or "_"


def unique_names(wanted: list[NamedTool]) -> dict[str, NamedTool]:
    """Give each tool a unique name: explicit names first, then derived ones get ``-2``, ``-3``."""
    taken: dict[str, NamedTool] = {}
    ordered = [t for t in wanted if t.explicit] + [t for t in wanted if not t.explicit]
    for tool in ordered:
        base = sanitize_tool_name(tool.wanted_name)
        name, counter = base, 1
        while name in taken:
            counter += 1
            suffix = f"-{counter}"
            name = base[:MAX_TOOL_NAME - len(suffix)] + suffix
        assert _TOOL_NAME_RE.match(name)
        taken[name] = tool
    return taken


def actor_tool_schema(message_contract: Contract | None) -> dict[str, Any]:
    """The input schema of an actor type's tool: ``actor_id`` plus the message contract.

    The message fields sit beside ``actor_id`` so a client fills one flat object.
    """
    schema = contract_schema(message_contract)
    properties = {"actor_id": {"type": "string", "minLength": 1,
                               "description": "Which actor receives the message"},
                  **schema.get("properties", {})}
    return {"type": "object", "properties": properties,
            "required": ["actor_id", *schema.get("required", [])],
            "additionalProperties": schema.get("additionalProperties", True)}


# --------------------------------------------------------------------------- capabilities


def remote_schemas(entry: ServedCapability) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The input/output schemas a handler learned elsewhere (a remote MCP tool), if any."""
    known = getattr(entry.handler, "known_schemas", None)
    if callable(known):
        found: tuple[dict[str, Any] | None, dict[str, Any] | None] = known()
        return found
    return None, None


def capability_schemas(entry: ServedCapability) -> tuple[dict[str, Any], dict[str, Any]]:
    """Input and output JSON Schemas of a capability: from its contracts, or (for a remote
    MCP tool without declared contracts) from the remote tool once it is known."""
    spec = entry.capability.spec
    learned_in, learned_out = remote_schemas(entry)
    inputs = contract_schema(spec.requires) if spec.requires is not None or learned_in is None \
        else learned_in
    outputs = contract_schema(spec.provides) if spec.provides is not None or learned_out is None \
        else learned_out
    return inputs, outputs


def capability_stats(registry: CollectorRegistry, entry: ServedCapability) -> dict[str, Any]:
    """Live figures of one capability, read from the engine's metrics."""
    calls: dict[str, float] = {}
    duration = {"count": 0.0, "sum_seconds": 0.0}
    violations = 0.0
    for family in registry.collect():
        for sample in family.samples:
            if sample.labels.get("capability") != entry.name:
                continue
            if sample.name == "packetflow_capability_calls_total":
                calls[sample.labels["code"]] = sample.value
            elif sample.name == "packetflow_capability_call_duration_seconds_count":
                duration["count"] = sample.value
            elif sample.name == "packetflow_capability_call_duration_seconds_sum":
                duration["sum_seconds"] = sample.value
            elif sample.name == "packetflow_contract_violations_total":
                violations = sample.value
    total = sum(calls.values())
    return {
        "in_flight": entry.in_flight,
        "calls": {code: int(count) for code, count in sorted(calls.items()) if count},
        "calls_total": int(total),
        "errors_total": int(total - calls.get(Code.OK.value, 0.0)),
        "mean_seconds": duration["sum_seconds"] / duration["count"] if duration["count"] else None,
        "contract_violations": int(violations),
    }


@dataclass
class CapabilitySource:
    """Every served capability with ``spec.mcp.expose`` as a tool, plus catalog resources.

    Calls go through ``Engine.invoke``: the same contracts, concurrency limits and metrics as
    gRPC ``Invoke``.
    """

    engine: Engine
    _tool_names: dict[str, str] = field(default_factory=dict)  # capability -> tool name

    def version(self) -> object:
        """The engine's registry object: replaced wholesale on every reload."""
        return self.engine.served

    def tools(self) -> Iterable[NamedTool]:
        """One tool per exposed capability."""
        for entry in self.engine.served.values():
            exposure = entry.capability.spec.mcp
            if not exposure.expose:
                continue
            yield NamedTool(exposure.name or entry.name, exposure.name is not None,
                            self._builder(entry.name))

    def _builder(self, capability: str) -> Callable[[str], ToolEntry]:
        def build(tool_name: str) -> ToolEntry:
            entry = self.engine.get(capability)
            self._tool_names[capability] = tool_name
            inputs, outputs = capability_schemas(entry)
            return ToolEntry(tool_name, entry.capability.spec.intent, inputs, outputs,
                             capability, self._runner(capability))

        return build

    def _runner(self, capability: str) -> ToolRunner:
        invoke = self.engine.invoke

        async def run(arguments: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
            return await invoke(capability, arguments, ctx)

        return run

    def resources(self) -> Iterable[ResourceEntry]:
        """The catalog, and each capability's description."""
        yield ResourceEntry(REGISTRY_URI, "registry",
                            "Every capability served here: intent, contracts, tool name")
        for entry in self.engine.served.values():
            yield ResourceEntry(CAPABILITY_URI_PREFIX + entry.name, entry.name,
                                entry.capability.spec.intent)

    def templates(self) -> Iterable[TemplateEntry]:
        """``capability://{name}``."""
        yield TemplateEntry(CAPABILITY_URI_TEMPLATE, "capability",
                            "One capability: contract, intent and live call statistics")

    async def read(self, uri: str) -> str | None:
        """The catalog or one capability as JSON text; ``None`` for other URIs."""
        if uri == REGISTRY_URI:
            return self._dump({"capabilities": [self._summary(e)
                                                for e in self.engine.served.values()]})
        if not uri.startswith(CAPABILITY_URI_PREFIX):
            return None
        entry = self.engine.served.get(uri.removeprefix(CAPABILITY_URI_PREFIX))
        if entry is None:
            return None
        spec = entry.capability.spec
        return self._dump({**self._summary(entry), "timeout_seconds": spec.timeout_seconds,
                           "concurrency": spec.concurrency,
                           "stats": capability_stats(self.engine.metrics.registry, entry)})

    def _summary(self, entry: ServedCapability) -> dict[str, Any]:
        spec = entry.capability.spec
        inputs, outputs = capability_schemas(entry)
        return {"name": entry.name, "uri": CAPABILITY_URI_PREFIX + entry.name,
                "tool": self._tool_names.get(entry.name) if spec.mcp.expose else None,
                "intent": spec.intent, "implementation": spec.implementation.kind,
                "effects": list(spec.effects), "requires": inputs, "provides": outputs}

    @staticmethod
    def _dump(value: Mapping[str, Any]) -> str:
        return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()
