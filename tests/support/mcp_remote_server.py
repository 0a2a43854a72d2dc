"""A real MCP server (the SDK's ``MCPServer``) for the consuming side's tests and the bench.

``python -m tests.support.mcp_remote_server [--port N] [--token T]`` serves streamable HTTP on
127.0.0.1, prints its port on stdout, and serves until stdin closes or it is killed. Tools:

- ``echo(message)`` -> ``{message}``: the bench baseline and the happy path.
- ``slow(seconds)``: sleeps (deadlines; killing the server mid-call).
- ``fails()``: a tool error (``isError: true``).
- ``greet(name)`` -> ``{greeting}``; ``reshape()`` replaces it by ``greet(first, last)``, so
  the consumer's cached schema goes stale (schema refresh).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvicorn
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel
from starlette.types import ASGIApp, Receive, Scope, Send

ROOT = Path(__file__).resolve().parents[2]


class Echoed(BaseModel):
    """What ``echo`` returns."""

    message: str


class Greeting(BaseModel):
    """What ``greet`` returns."""

    greeting: str


def build_server() -> MCPServer:
    """The test server with its tools."""
    server = MCPServer("remote-test")

    @server.tool(description="Return the message it is given")
    def echo(message: str) -> Echoed:
        return Echoed(message=message)

    @server.tool(description="Sleep, then say so")
    async def slow(seconds: float) -> Echoed:
        await asyncio.sleep(seconds)
        return Echoed(message=f"slept {seconds}")

    @server.tool(description="Always fails")
    def fails() -> Echoed:
        raise ToolError("the remote tool broke on purpose")

    def greet_v1(name: str) -> Greeting:
        return Greeting(greeting=f"hello {name}")

    def greet_v2(first: str, last: str) -> Greeting:
        return Greeting(greeting=f"hello {first} {last}")

    server.add_tool(greet_v1, name="greet", description="Greet someone")

    @server.tool(description="Change greet's arguments to first and last")
    def reshape() -> Echoed:
        server.remove_tool("greet")
        server.add_tool(greet_v2, name="greet", description="Greet someone by full name")
        return Echoed(message="reshaped")

    return server


class TokenGate:
    """Refuses requests without the bearer token (to test ``headersFrom``)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app, self.expected = app, f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not any(
                k == b"authorization" and hmac.compare_digest(v, self.expected)
                for k, v in scope["headers"]):
            await send({"type": "http.response.start", "status": 401, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await self.app(scope, receive, send)


async def serve(port: int, token: str | None) -> None:
    """Serve until stdin closes; print the port first."""
    app: ASGIApp = build_server().streamable_http_app(stateless_http=True, host="127.0.0.1")
    if token:
        app = TokenGate(app, token)
    sock = socket.create_server(("127.0.0.1", port), backlog=2048)
    config = uvicorn.Config(app, lifespan="on", ws="none", log_level="warning",
                            access_log=False)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    # The socket already listens: connections wait in its backlog until uvicorn accepts.
    print(sock.getsockname()[1], flush=True)
    await asyncio.to_thread(sys.stdin.read)
    server.should_exit = True
    await task


@contextlib.asynccontextmanager
async def remote_server(token: str | None = None) -> AsyncIterator[tuple[str, Any]]:
    """This server in a subprocess; yields (url, process)."""
    extra = ["--token", token] if token else []
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.support.mcp_remote_server", *extra,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL, cwd=ROOT)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        async with asyncio.timeout(30):
            port = int(await proc.stdout.readline())
        yield f"http://127.0.0.1:{port}/mcp", proc
    finally:
        if proc.returncode is None:
            proc.stdin.close()
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


def main() -> None:
    """Entry point of the server subprocess."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.token))


if __name__ == "__main__":
    main()
