"""The MCP server: tools and resources of the registered tool sources, on the official SDK.

Built on the SDK's low-level ``Server`` so the wire schemas are exactly the contracts (no
signature introspection). Transports (streamable HTTP, stdio, in-process) wrap ``.server``.
Errors of a call are tool results (``isError: true``) naming the field, so a model can correct
itself; only an unknown tool or resource is a protocol error, as the specification asks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import mcp_types as types
import orjson
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.session import ServerSession
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS

from packetflow import __version__
from packetflow.actors.runtime import ActorSystem
from packetflow.context import CallContext
from packetflow.engine import Engine
from packetflow.errors import ContractViolation, InvalidInput, PacketFlowError, code_of
from packetflow.identity.workload import Principal
from packetflow.mcp.actors import ActorSource
from packetflow.mcp.tools import (
    MESSAGE_ID_META,
    CapabilitySource,
    ToolEntry,
    ToolSource,
    unique_names,
)

log = logging.getLogger("packetflow.mcp")

# MCP's "resource not found" (2025-11-25, server/resources); the SDK has no constant for it.
RESOURCE_NOT_FOUND = -32002
ERROR_META_KEY = "io.packetflow/error"
CLIENT_INFO_META_KEY = "io.modelcontextprotocol/clientInfo"
# The ASGI scope key holding an HTTPS connection's proof: a Principal or an AuthenticationError.
PROOF_SCOPE_KEY = "packetflow.proof"

Context = ServerRequestContext[Any, Any]


class ProgressRelay:
    """A ``CallContext`` progress sink that forwards events as MCP progress notifications.

    The sink is synchronous (handlers call it without awaiting), so events queue up and one
    task sends them in order. The task starts with the first event: calls that never report
    progress (most of them) pay nothing.
    """

    def __init__(self, session: ServerSession) -> None:
        self.session = session
        self.queue: asyncio.Queue[tuple[str, float] | None] | None = None
        self.task: asyncio.Task[None] | None = None
        self.count = 0

    def __call__(self, message: str, fraction: float) -> None:
        if self.queue is None:
            self.queue = asyncio.Queue()
            self.task = asyncio.get_running_loop().create_task(self._send(self.queue))
        self.queue.put_nowait((message, fraction))

    async def _send(self, queue: asyncio.Queue[tuple[str, float] | None]) -> None:
        while (event := await queue.get()) is not None:
            message, fraction = event
            self.count += 1
            # A known fraction is progress out of 1; otherwise count the events (MCP only
            # asks that progress increases).
            progress, total = (fraction, 1.0) if fraction >= 0 else (float(self.count), None)
            try:
                await self.session.report_progress(progress, total, message or None)
            except Exception:  # a client that went away must not fail the call
                log.debug("progress notification not delivered", exc_info=True)

    async def flush(self) -> None:
        """Send what is queued (before the result, so clients see progress first)."""
        if self.queue is not None and self.task is not None:
            self.queue.put_nowait(None)
            await self.task

    def cancel(self) -> None:
        """Drop pending events (the call was cancelled)."""
        if self.task is not None:
            self.task.cancel()


def tool_result(output: dict[str, Any]) -> types.CallToolResult:
    """A successful result: structured content, and the same JSON as text for older clients."""
    return types.CallToolResult(content=[types.TextContent(text=orjson.dumps(output).decode())],
                                structured_content=output)


def error_result(error: PacketFlowError, trace_id: str) -> types.CallToolResult:
    """A failed call as a tool error: the message (naming fields) for the model, details in
    ``_meta`` for programs."""
    code = code_of(error)
    detail: dict[str, Any] = {"code": code.value, "message": error.message, "traceId": trace_id}
    if isinstance(error, InvalidInput | ContractViolation):
        detail["violations"] = [{"field": v.field, "description": v.description}
                                for v in error.violations]
    return types.CallToolResult(content=[types.TextContent(text=f"{code.value}: {error.message}")],
                                is_error=True, _meta={ERROR_META_KEY: detail})


def proven_caller(ctx: Context) -> Principal | None:
    """The caller the request's connection proved with its client certificate (HTTPS under
    zero trust; see :mod:`packetflow.mcp.http`), if any."""
    scope = getattr(ctx.request, "scope", None)
    proof = scope.get(PROOF_SCOPE_KEY) if isinstance(scope, dict) else None
    return proof if isinstance(proof, Principal) else None


def _caller(ctx: Context) -> str | None:
    """The client's name as it introduced itself (either protocol era), for the CallContext."""
    info: Any = (ctx.meta or {}).get(CLIENT_INFO_META_KEY)
    if isinstance(info, dict):
        name = info.get("name")
        return f"mcp:{name}" if isinstance(name, str) else "mcp"
    params = ctx.session.client_params
    return f"mcp:{params.client_info.name}" if params is not None else "mcp"


@dataclass
class _Catalog:
    """The tool name map for one version of every source (rebuilt when a source changes)."""

    versions: tuple[object, ...]
    tools: dict[str, ToolEntry]


class McpService:
    """The MCP face of a runtime: tool sources behind one SDK ``Server``."""

    def __init__(self, sources: Iterable[ToolSource], name: str = "packetflow") -> None:
        self.sources: list[ToolSource] = list(sources)
        self._catalog = _Catalog((), {})
        self.server: Server[Any] = Server(
            name, version=__version__,
            instructions="Capabilities and actors served by PacketFlow; read "
                         "capability://registry for the catalog and actor://{type}/{id} for "
                         "an actor's state.",
            on_list_tools=self._list_tools, on_call_tool=self._call_tool,
            on_list_resources=self._list_resources,
            on_list_resource_templates=self._list_templates,
            on_read_resource=self._read_resource)

    @classmethod
    def for_engine(cls, engine: Engine, name: str = "packetflow") -> McpService:
        """Serve the engine's capabilities."""
        return cls([CapabilitySource(engine)], name)

    @classmethod
    def for_runtime(cls, engine: Engine, actors: ActorSystem | None,
                    name: str = "packetflow") -> McpService:
        """Serve a runtime: its capabilities and, when there is an actor system, its actor
        types (tool names are unique across both)."""
        service = cls.for_engine(engine, name)
        if actors is not None:
            service.add_source(ActorSource(actors))
        return service

    def add_source(self, source: ToolSource) -> None:
        """Offer another source's tools and resources (e.g. actor types)."""
        self.sources.append(source)

    # ------------------------------------------------------------------------------ tools

    def catalog(self) -> dict[str, ToolEntry]:
        """Tool name -> entry, rebuilt only when a source reports a new version."""
        versions = tuple(source.version() for source in self.sources)
        catalog = self._catalog
        if len(versions) != len(catalog.versions) or any(
                a is not b for a, b in zip(versions, catalog.versions, strict=True)):
            named = unique_names([tool for source in self.sources for tool in source.tools()])
            catalog = self._catalog = _Catalog(
                versions, {name: tool.build(name) for name, tool in named.items()})
        return catalog.tools

    def list_tools(self) -> list[types.Tool]:
        """The tools as MCP describes them (schemas re-read: a remote tool's may change)."""
        named = unique_names([tool for source in self.sources for tool in source.tools()])
        return [types.Tool(name=entry.name, title=entry.title, description=entry.description,
                           input_schema=entry.input_schema, output_schema=entry.output_schema)
                for entry in (tool.build(name) for name, tool in named.items())]

    async def _list_tools(self, ctx: Context,
                          params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        return types.ListToolsResult(tools=self.list_tools())

    async def _call_tool(self, ctx: Context,
                         params: types.CallToolRequestParams) -> types.CallToolResult:
        tool = self.catalog().get(params.name)
        if tool is None:
            raise MCPError(INVALID_PARAMS, f"Unknown tool: {params.name}")
        principal = proven_caller(ctx)
        call = CallContext(capability=tool.target, trace_id=os.urandom(16).hex(),
                           caller=principal.caller if principal else _caller(ctx),
                           principal=principal)
        message_id = (params.meta or {}).get(MESSAGE_ID_META)
        if isinstance(message_id, str) and message_id:
            call.metadata[MESSAGE_ID_META] = message_id
        relay = ProgressRelay(ctx.session)
        call.progress_sink = relay
        try:
            output = await tool.run(params.arguments or {}, call)
        except PacketFlowError as exc:
            await relay.flush()
            return error_result(exc, call.trace_id)
        except BaseException:
            relay.cancel()  # cancelled by the client (or failing): stop relaying too
            raise
        await relay.flush()
        return tool_result(output)

    # -------------------------------------------------------------------------- resources

    async def _list_resources(self, ctx: Context, params: types.PaginatedRequestParams | None
                              ) -> types.ListResourcesResult:
        self.catalog()  # resources name tools: make sure names are current
        return types.ListResourcesResult(resources=[
            types.Resource(uri=r.uri, name=r.name, description=r.description,
                           mime_type=r.mime_type)
            for source in self.sources for r in source.resources()])

    async def _list_templates(self, ctx: Context, params: types.PaginatedRequestParams | None
                              ) -> types.ListResourceTemplatesResult:
        return types.ListResourceTemplatesResult(resource_templates=[
            types.ResourceTemplate(uri_template=t.uri_template, name=t.name,
                                   description=t.description, mime_type=t.mime_type)
            for source in self.sources for t in source.templates()])

    async def _read_resource(self, ctx: Context,
                             params: types.ReadResourceRequestParams) -> types.ReadResourceResult:
        self.catalog()
        uri = str(params.uri)
        for source in self.sources:
            with contextlib.suppress(LookupError):
                text = await source.read(uri)
                if text is not None:
                    return types.ReadResourceResult(contents=[types.TextResourceContents(
                        uri=uri, mime_type="application/json", text=text)])
        raise MCPError(RESOURCE_NOT_FOUND, f"Resource not found: {uri}", {"uri": uri})
