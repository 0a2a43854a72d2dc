"""MCP both ways: capabilities and actor types served as MCP tools, and remote MCP tools used
as capabilities or by actors (``ctx.tools``).

- ``tools``: the registry of tool sources, and capabilities as one source.
- ``actors``: actor types as tools and ``actor://{type}/{id}`` resources (another source).
- ``server``: the MCP server (official SDK, low-level ``Server``) over those sources.
- ``http``: streamable HTTP at ``/mcp`` (stateless, DNS-rebinding checks, bearer token).
- ``remote``: a remote MCP server's tool as a capability handler.
- ``toolbox``: ``ctx.tools.call(name, args)`` for actors, over local capabilities or remote tools.
"""

from __future__ import annotations
