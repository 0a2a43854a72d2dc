"""Actor types as MCP tools and actors as ``actor://{type}/{id}`` resources.

A call runs ``ActorType.send``, the path gRPC ``Send`` takes: the message contract, one turn
at a time per actor, the reply only after the new state committed, turn metrics, the turn
deadline and forwarding to the owning member. A client cancellation cancels the turn (the
store write, once started, still lands).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import islice
from typing import Any
from urllib.parse import quote, unquote

import orjson

from packetflow.actors.active import ACTOR_ID_RE
from packetflow.actors.runtime import ActorSystem, ActorType
from packetflow.context import CallContext
from packetflow.contracts import contract_schema
from packetflow.errors import CapabilityNotFound, FieldViolation, InvalidInput
from packetflow.mcp.tools import (
    MESSAGE_ID_META,
    NamedTool,
    ResourceEntry,
    TemplateEntry,
    ToolEntry,
    ToolRunner,
    actor_tool_schema,
)

ACTOR_URI_PREFIX = "actor://"
ACTOR_URI_TEMPLATE = "actor://{type}/{id}"
ACTOR_ID_ARGUMENT = "actor_id"
# resources/list shows active actors only, and at most this many per type: the template
# reaches every stored actor, and a listing of 100k ids would help no client.
LISTED_PER_TYPE = 100


def actor_uri(actor_type: str, actor_id: str) -> str:
    """The resource URI of one actor (the id percent-encoded, so any id round-trips)."""
    return f"{ACTOR_URI_PREFIX}{quote(actor_type, safe='')}/{quote(actor_id, safe='')}"


def parse_actor_uri(uri: str) -> tuple[str, str] | None:
    """``actor://{type}/{id}`` -> (type, id); ``None`` for any other URI."""
    if not uri.startswith(ACTOR_URI_PREFIX):
        return None
    actor_type, slash, actor_id = uri.removeprefix(ACTOR_URI_PREFIX).partition("/")
    if not slash or not actor_type or not actor_id:
        return None
    return unquote(actor_type), unquote(actor_id)


def split_arguments(arguments: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A tool call's arguments -> (actor id, message); a bad ``actor_id`` names that field."""
    message = dict(arguments)
    actor_id = message.pop(ACTOR_ID_ARGUMENT, None)
    if not isinstance(actor_id, str) or not ACTOR_ID_RE.match(actor_id):
        problem = "is required" if actor_id is None else "must be 1-256 printable characters"
        raise InvalidInput([FieldViolation(ACTOR_ID_ARGUMENT, problem)])
    return actor_id, message


@dataclass
class ActorSource:
    """Every served actor type with ``spec.mcp.expose`` as a tool, and actors as resources."""

    system: ActorSystem

    def version(self) -> object:
        """The system's type map: replaced wholesale when the served types change."""
        return self.system.types

    def tools(self) -> Iterable[NamedTool]:
        """One tool per exposed actor type."""
        for kind in self.system.types.values():
            exposure = kind.spec.mcp
            if exposure.expose:
                yield NamedTool(exposure.name or kind.name, exposure.name is not None,
                                self._builder(kind))

    def _builder(self, kind: ActorType) -> Callable[[str], ToolEntry]:
        def build(tool_name: str) -> ToolEntry:
            spec = kind.spec
            return ToolEntry(tool_name, spec.intent, actor_tool_schema(spec.requires),
                             contract_schema(spec.provides), kind.name,
                             self._runner(kind.name))

        return build

    def _runner(self, type_name: str) -> ToolRunner:
        system = self.system

        async def run(arguments: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
            actor_id, message = split_arguments(arguments)
            # Looked up per call: a reload may have restarted the type since the tool list.
            result = await system.get(type_name).send(
                actor_id, message, message_id=ctx.metadata.get(MESSAGE_ID_META),
                trace_id=ctx.trace_id, caller=ctx.caller, deadline=ctx.deadline)
            return result.reply

        return run

    def resources(self) -> Iterable[ResourceEntry]:
        """The actors active in this process (a sample: the template reaches all of them)."""
        for kind in self.system.types.values():
            # Committed ones only: an actor whose first turn has not committed has no state.
            committed = (actor_id for actor_id, actor in kind.active.items() if actor.version)
            for actor_id in list(islice(committed, LISTED_PER_TYPE)):
                yield ResourceEntry(actor_uri(kind.name, actor_id), f"{kind.name}/{actor_id}",
                                    f"Actor {actor_id} of type {kind.name}")

    def templates(self) -> Iterable[TemplateEntry]:
        """``actor://{type}/{id}``."""
        yield TemplateEntry(ACTOR_URI_TEMPLATE, "actor",
                            "One actor: its state, memory summary and reminders")

    async def read(self, uri: str) -> str | None:
        """One actor as ``GetActor`` describes it; ``None`` for other URIs or no such actor."""
        parsed = parse_actor_uri(uri)
        if parsed is None:
            return None
        actor_type, actor_id = parsed
        try:
            described = await self.system.get(actor_type).describe(actor_id)
        except (CapabilityNotFound, InvalidInput):  # no such type or actor, or a bad id
            return None
        return orjson.dumps({"type": actor_type, "id": actor_id, **described},
                            option=orjson.OPT_INDENT_2).decode()
