"""MCP both ways: capabilities served as MCP tools, and remote MCP tools run as capabilities.

- ``tools``: the registry of tool sources (capabilities now; actor types plug in the same way).
- ``server``: the MCP server (official SDK, low-level ``Server``) over those sources.
- ``http``: streamable HTTP at ``/mcp`` (stateless, DNS-rebinding checks, bearer token).
- ``remote``: a remote MCP server's tool as a capability handler.
- ``toolbox``: ``ctx.tools.call(name, args)`` for actors, over local capabilities or remote tools.
"""

from __future__ import annotations
