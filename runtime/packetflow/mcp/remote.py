"""A remote MCP server's tool as a capability handler (implementation ``mcp: {url, tool}``).

The contract comes from the remote tool's ``inputSchema``/``outputSchema`` unless the manifest
declares ``requires``/``provides`` (the engine checks those). The schemas are fetched on first
use and fetched again when the server says its tool list changed
(``notifications/tools/list_changed``) or when an input no longer fits the cached schema.

Failures become domain errors with the right codes: server down or connection lost ->
UNAVAILABLE, too slow -> DEADLINE_EXCEEDED (the engine's deadline is armed around every
call, so nothing waits past it), malformed reply or a failing remote tool -> INTERNAL,
no such tool there -> FAILED_PRECONDITION.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx2
import mcp_types as types
import orjson
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from mcp.client import Client
from mcp.client.session import IncomingMessage
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import CONNECTION_CLOSED, INVALID_PARAMS, METHOD_NOT_FOUND, REQUEST_TIMEOUT
from pydantic import ValidationError

from packetflow.context import CallContext
from packetflow.contracts import CompiledContract
from packetflow.errors import (
    ContractViolation,
    DeadlineExceeded,
    FieldViolation,
    HandlerFailed,
    InvalidInput,
    NotServable,
    PacketFlowError,
    Unavailable,
)
from packetflow.spec import ValueSource
from packetflow.validation import ImplementationError

log = logging.getLogger("packetflow.mcp.remote")

CONNECT_TIMEOUT = 10.0
# The longest remote reply text quoted in an error message.
QUOTE_CHARS = 500
# Servers hold SSE response streams open for long calls; the call's deadline bounds them.
HTTP_TIMEOUT = httpx2.Timeout(CONNECT_TIMEOUT, read=3600.0)


def resolve_headers(headers_from: Mapping[str, ValueSource],
                    environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Header name -> value from the environment; ``KeyError`` names a missing variable."""
    env = os.environ if environ is None else environ
    return {name: source.resolve(env) for name, source in headers_from.items()}


def _quote(text: str) -> str:
    return text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS] + "..."


class _Attempt:
    """One connection attempt and, once it succeeds, its session: the owner task, the
    future its callers await, and the event that tells the owner to close."""

    def __init__(self, url: str, owner: asyncio.Task[None], ready: asyncio.Future[Client],
                 closing: asyncio.Event) -> None:
        self.url = url
        self.owner = owner
        self.ready = ready
        self.closing = closing

    def usable(self) -> bool:
        """Connected or still connecting, and not told to close."""
        if self.owner.done() or self.closing.is_set():
            return False
        ready = self.ready
        return not ready.done() or (not ready.cancelled() and ready.exception() is None)

    def live(self) -> Client | None:
        return self.ready.result() if self.usable() and self.ready.done() else None

    def close(self, error: Exception | None = None) -> None:
        """Tell the owner to close: a session winds down, a connect in flight is abandoned
        (its callers get ``error``)."""
        self.closing.set()
        if not self.ready.done():
            self.owner.cancel()  # it may not have started: it cannot be left to fail them
            self.ready.set_exception(error or Unavailable(
                f"MCP server {self.url} closed the connection"))


class McpConnection:
    """One MCP client session to a remote server, opened on demand and reopened after a loss.

    The SDK's ``Client`` must be entered and left in the same task, so a background task owns
    it for its whole life; calls from any task share it (requests are multiplexed). One
    connection attempt runs at a time: callers arriving while it is in flight wait for the
    same one, and a caller that gives up (its deadline, a cancellation) does not abandon it
    for the others. The attempt itself ends after ``CONNECT_TIMEOUT``.
    """

    def __init__(self, url: str, headers: Mapping[str, str] | None = None) -> None:
        self.url = url
        self.headers = dict(headers or {})
        self.tools_changed = asyncio.Event()  # set by the server's list_changed notification
        self._attempt: _Attempt | None = None
        # Every owner task not yet ended, the current one and any still closing.
        self._owners: set[asyncio.Task[None]] = set()

    async def client(self) -> Client:
        """The live client, connecting first if there is none (``Unavailable`` if it fails)."""
        attempt = self._attempt
        if attempt is None or not attempt.usable():
            attempt = self._start()
        elif (client := attempt.live()) is not None:
            return client
        try:
            # Shielded: this caller's cancellation must not cancel the attempt others share.
            return await asyncio.shield(attempt.ready)
        except Unavailable as exc:
            raise Unavailable(exc.message) from None
        except Exception as exc:
            raise Unavailable(f"MCP server {self.url} is unreachable: {_reason(exc)}") from None

    def _start(self) -> _Attempt:
        if self._attempt is not None:
            self._attempt.close()
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[Client] = loop.create_future()
        ready.add_done_callback(_retrieve)  # a failure nobody waited for is no loop error
        closing = asyncio.Event()
        owner = loop.create_task(self._own(ready, closing))
        self._owners.add(owner)
        owner.add_done_callback(self._owners.discard)
        attempt = self._attempt = _Attempt(self.url, owner, ready, closing)
        expiry = loop.call_later(CONNECT_TIMEOUT, self._expire, attempt)
        ready.add_done_callback(lambda _: expiry.cancel())
        return attempt

    def _expire(self, attempt: _Attempt) -> None:
        if not attempt.ready.done():  # connected just now: its done callback has not run yet
            attempt.close(Unavailable(
                f"MCP server {self.url} did not answer within {CONNECT_TIMEOUT:g}s"))

    async def _own(self, ready: asyncio.Future[Client], closing: asyncio.Event) -> None:
        try:
            async with (httpx2.AsyncClient(headers=self.headers, timeout=HTTP_TIMEOUT) as http,
                        Client(streamable_http_client(self.url, http_client=http),
                               message_handler=self._on_message, cache=None) as client):
                if not ready.done():
                    ready.set_result(client)
                await closing.wait()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the SDK reports transport failures as exception groups
            if not ready.done() and isinstance(leaf := _unwrap(exc), Exception):
                ready.set_exception(leaf)
            elif ready.done() and not closing.is_set():  # lost, not closed on purpose
                log.warning("connection to MCP server lost", extra={
                    "url": self.url, "reason": _reason(exc)})
        finally:
            if not ready.done():
                ready.set_exception(Unavailable(f"MCP server {self.url} closed the connection"))

    async def _on_message(self, message: IncomingMessage) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            self.tools_changed.set()

    def reset(self, client: Client | None = None) -> None:
        """Drop the session (after a failure); the next call reconnects. Given the ``client``
        that failed, only its session is dropped, not a newer one."""
        attempt = self._attempt
        if attempt is not None and (client is None or attempt.live() is client):
            attempt.close()

    async def aclose(self) -> None:
        """Close the session, abandon a connect in flight and wait for their tasks to end."""
        self.reset()
        self._attempt = None
        owners = set(self._owners)
        if not owners:
            return
        _, pending = await asyncio.wait(owners, timeout=5.0)
        for owner in pending:
            owner.cancel()
        if pending:
            _, stuck = await asyncio.wait(pending, timeout=5.0)
            if stuck:
                log.warning("an MCP connection task did not end", extra={"url": self.url})


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _unwrap(exc: BaseException) -> BaseException:
    """The first leaf of nested exception groups (what actually went wrong)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _reason(exc: BaseException) -> str:
    leaf = _unwrap(exc)
    return f"{type(leaf).__name__}: {leaf}" if str(leaf) else type(leaf).__name__


@dataclass(frozen=True)
class ToolSchemas:
    """A remote tool's contract as last listed."""

    input_schema: dict[str, Any]
    output_schema: dict[str, Any] | None
    requires: CompiledContract
    provides: CompiledContract | None


def compile_schema(schema: dict[str, Any]) -> CompiledContract:
    """A JSON Schema from a remote server as a contract the runtime can check values with."""
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise HandlerFailed(f"the remote tool's schema is not valid JSON Schema: "
                            f"{exc.message}") from None
    return CompiledContract(schema, Draft202012Validator(schema), {})


class RemoteMcpTool:
    """The handler: validates against the remote contract, calls the tool, maps failures."""

    def __init__(self, url: str, tool: str, headers: Mapping[str, str] | None = None, *,
                 check_input: bool = True, check_output: bool = True,
                 connection: McpConnection | None = None) -> None:
        self.url = url
        self.tool = tool
        self.check_input = check_input  # False when the manifest declares `requires`
        self.check_output = check_output  # False when the manifest declares `provides`
        self.connection = connection or McpConnection(url, headers)
        self.schemas: ToolSchemas | None = None

    def known_schemas(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """The remote input/output schemas, once fetched (for tools/list and Describe)."""
        if self.schemas is None:
            return None, None
        return self.schemas.input_schema, self.schemas.output_schema

    async def refresh(self) -> ToolSchemas:
        """List the server's tools again and keep this tool's schemas."""
        client = await self.connection.client()
        self.connection.tools_changed.clear()
        try:
            listing = await client.list_tools()
        except Exception as exc:
            self.connection.reset(client)
            raise _call_error(exc, self.url, self.tool) from None
        found = next((t for t in listing.tools if t.name == self.tool), None)
        if found is None:
            raise NotServable(f"MCP server {self.url} has no tool {self.tool!r}")
        output = found.output_schema
        self.schemas = ToolSchemas(found.input_schema, output, compile_schema(found.input_schema),
                                   compile_schema(output) if output is not None else None)
        return self.schemas

    async def verify(self, timeout: float) -> None:
        """Load-time check: the tool exists on the server (its schemas are kept).

        A server that is not reachable yet is only logged: it may start after us, and the
        first call fetches the schemas. A reachable server without the tool is an
        ImplementationError naming ``spec.implementation.mcp.tool``.
        """
        try:
            await asyncio.wait_for(self.refresh(), timeout)
        except NotServable as exc:
            raise ImplementationError("spec.implementation.mcp.tool", exc.message) from None
        except (PacketFlowError, TimeoutError) as exc:
            log.warning("MCP server %s not reachable at load (%s); its tool %r is checked "
                        "on the first call", self.url, exc, self.tool)

    async def current_schemas(self) -> ToolSchemas:
        """The cached schemas, fetched again if unknown or the server announced a change."""
        if self.schemas is None or self.connection.tools_changed.is_set():
            return await self.refresh()
        return self.schemas

    async def __call__(self, value: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        schemas = await self.current_schemas()
        if self.check_input:
            value, schemas = await self._checked_input(value, schemas)
        result = await self._call(value, ctx)
        output = tool_output(result, self.url, self.tool)
        if self.check_output and schemas.provides is not None:
            output, violations = schemas.provides.check(output, "output")
            if violations:
                raise ContractViolation(self.tool, violations)
        return output

    async def _checked_input(self, value: dict[str, Any],
                             schemas: ToolSchemas) -> tuple[dict[str, Any], ToolSchemas]:
        checked, violations = schemas.requires.check(value, "input")
        if violations:
            # The schema may be stale (the server changed the tool): check against a fresh one
            # before refusing.
            schemas = await self.refresh()
            checked, violations = schemas.requires.check(value, "input")
            if violations:
                raise InvalidInput(violations)
        return checked, schemas

    async def _call(self, value: dict[str, Any], ctx: CallContext) -> types.CallToolResult:
        client = await self.connection.client()

        async def relay(progress: float, total: float | None, message: str | None) -> None:
            ctx.progress(message or "", progress / total if total else -1.0)

        try:
            return await client.call_tool(self.tool, value,
                                          read_timeout_seconds=ctx.time_remaining(),
                                          progress_callback=relay)
        except MCPError as exc:
            if exc.code == INVALID_PARAMS:
                self.schemas = None  # our idea of the arguments was wrong: list again next time
            if exc.code == CONNECTION_CLOSED:
                self.connection.reset(client)
            raise _call_error(exc, self.url, self.tool) from None
        except (PacketFlowError, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise _call_error(exc, self.url, self.tool) from None

    async def aclose(self) -> None:
        """Close the connection (the engine calls this when the capability is retired)."""
        await self.connection.aclose()


def _call_error(exc: BaseException, url: str, tool: str) -> PacketFlowError:
    """The domain error for a failed remote call."""
    leaf = _unwrap(exc)
    if isinstance(leaf, PacketFlowError):
        return leaf
    if isinstance(leaf, MCPError):
        if leaf.code == CONNECTION_CLOSED:
            return Unavailable(f"MCP server {url} closed the connection during the call")
        if leaf.code == REQUEST_TIMEOUT:
            return DeadlineExceeded(f"MCP server {url} did not answer before the deadline")
        if leaf.code == INVALID_PARAMS:
            return InvalidInput([FieldViolation("input", f"refused by {url}: {leaf.message}")])
        if leaf.code == METHOD_NOT_FOUND:
            return NotServable(f"MCP server {url} does not serve tools: {leaf.message}")
        return HandlerFailed(f"MCP server {url} failed tool {tool!r}: {_quote(leaf.message)}")
    if isinstance(leaf, TimeoutError):
        return DeadlineExceeded(f"MCP server {url} did not answer before the deadline")
    if isinstance(leaf, ValidationError | RuntimeError | ValueError):
        # The SDK's checks of the reply: not MCP, or structured content breaking the schema.
        return HandlerFailed(f"MCP server {url} sent a malformed reply to {tool!r}: "
                             f"{_quote(str(leaf).splitlines()[0] if str(leaf) else '')}")
    if isinstance(leaf, httpx2.HTTPStatusError):
        status = leaf.response.status_code
        if status in (401, 403):
            return Unavailable(f"MCP server {url} refused the credentials (HTTP {status})")
        return Unavailable(f"MCP server {url} answered HTTP {status}")
    if isinstance(leaf, httpx2.HTTPError | OSError):
        return Unavailable(f"MCP server {url} is unreachable: {_reason(leaf)}")
    return HandlerFailed(f"calling {tool!r} on MCP server {url} failed: {_reason(leaf)}")


def tool_output(result: types.CallToolResult, url: str, tool: str) -> dict[str, Any]:
    """The capability output of a tool result: its structured content, else its text as a
    JSON object, else ``{"text": ...}``; a tool error (``isError``) raises."""
    text = "\n".join(block.text for block in result.content
                     if isinstance(block, types.TextContent))
    if result.is_error:
        raise HandlerFailed(f"remote tool {tool!r} at {url} failed: {_quote(text)}")
    if result.structured_content is not None:
        if not isinstance(result.structured_content, dict):
            raise HandlerFailed(f"MCP server {url} sent structured content that is not an "
                                f"object for {tool!r}")
        return result.structured_content
    with contextlib.suppress(orjson.JSONDecodeError):
        parsed = orjson.loads(text)
        if isinstance(parsed, dict):
            return parsed
    return {"text": text}
