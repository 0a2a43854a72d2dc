"""``ctx.tools`` for actors: call the tools an actor type declares in ``mcpTools`` by name.

A tool is a local capability (run through the engine, with its contracts, limits and metrics)
or a tool of a remote MCP server (``url`` + ``tool``, one connection per server and headers).
The actor runtime builds one ``McpToolbox`` per actor type; each turn's ``ctx.tools``
(``packetflow.actors.context.Tools``) calls it with the turn's trace, caller and deadline.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from packetflow.context import CallContext
from packetflow.errors import CapabilityNotFound, DeadlineExceeded, PacketFlowError
from packetflow.spec import McpToolRef

if TYPE_CHECKING:
    from packetflow.composition.executor import Invoke
    from packetflow.mcp.remote import McpConnection, RemoteMcpTool


class ToolNotDeclared(CapabilityNotFound):
    """The actor called a tool its manifest does not declare in ``mcpTools``."""

    def __init__(self, name: str, known: Sequence[str]) -> None:
        PacketFlowError.__init__(self, f"tool {name!r} is not declared in mcpTools "
                                       f"(declared: {', '.join(known) or 'none'})")
        self.name = name


class ToolboxError(Exception):
    """An ``mcpTools`` entry cannot be set up; ``path`` names the manifest field."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


class McpToolbox:
    """The declared tools of one actor type, callable by name.

    Headers are resolved now, so a missing secret is a load error (``ToolboxError`` naming
    the header), not a failure of the first call.
    """

    def __init__(self, refs: Sequence[McpToolRef], invoke: Invoke,
                 environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.refs = {ref.name: ref for ref in refs}
        self.invoke = invoke
        self._connections: dict[tuple[str, tuple[tuple[str, str], ...]], McpConnection] = {}
        self._remote: dict[str, RemoteMcpTool] = {}
        if any(ref.url is not None for ref in refs):
            self._add_remote(refs, env)

    def _add_remote(self, refs: Sequence[McpToolRef], env: Mapping[str, str]) -> None:
        # The MCP client stack loads only for actor types that call remote servers.
        from packetflow.mcp.remote import McpConnection, RemoteMcpTool, resolve_headers

        for index, ref in enumerate(refs):
            if ref.url is None:
                continue
            headers: dict[str, str] = {}
            for header, source in ref.headers_from.items():
                try:
                    headers.update(resolve_headers({header: source}, env))
                except KeyError as exc:
                    raise ToolboxError(f"spec.mcpTools[{index}].headersFrom.{header}",
                                       str(exc.args[0])) from None
            # One session per server and credentials, shared by the tools that use it.
            key = (ref.url, tuple(sorted(headers.items())))
            connection = self._connections.get(key)
            if connection is None:
                connection = self._connections[key] = McpConnection(ref.url, headers)
            self._remote[ref.name] = RemoteMcpTool(ref.url, ref.tool or ref.name,
                                                   connection=connection)

    def names(self) -> list[str]:
        """The tool names an actor may call."""
        return sorted(self.refs)

    async def call(self, name: str, args: dict[str, Any],
                   ctx: CallContext | None = None) -> dict[str, Any]:
        """Call tool ``name``; the caller's context (trace, deadline) carries over."""
        ref = self.refs.get(name)
        if ref is None:
            raise ToolNotDeclared(name, self.names())
        target = ref.capability or ref.name
        call = CallContext(capability=target,
                           trace_id=ctx.trace_id if ctx else os.urandom(16).hex(),
                           caller=ctx.caller if ctx else None,
                           deadline=ctx.deadline if ctx else None)
        if ref.capability is not None:
            return await self.invoke(ref.capability, args, call)
        return await self._remote_call(name, args, call)

    async def _remote_call(self, name: str, args: dict[str, Any],
                           ctx: CallContext) -> dict[str, Any]:
        # A remote call is not run by the engine, so the caller's deadline is armed here.
        if ctx.deadline is None:
            return await self._remote[name](args, ctx)
        try:
            async with asyncio.timeout_at(ctx.deadline):
                return await self._remote[name](args, ctx)
        except TimeoutError:
            raise DeadlineExceeded(f"tool {name!r} did not finish before the deadline") from None

    async def aclose(self) -> None:
        """Close the connections to remote servers."""
        for connection in self._connections.values():
            await connection.aclose()

