"""The ``http`` builtin: one request to an allow-listed host, the response as output."""

from __future__ import annotations

import asyncio
import re
from typing import Any
from urllib.parse import quote

import httpx

from packetflow.builtin_configs import HttpConfig, effective_authority, host_allowed
from packetflow.builtins.templating import Filler
from packetflow.context import CallContext
from packetflow.errors import DeadlineExceeded, FieldViolation, InvalidInput, Unavailable


def _quote_all(text: str) -> str:
    # safe="": an input value can never add "/", "?", "#" or "@" to the URL, so it cannot
    # move the request to another host or path segment; the host is re-checked anyway.
    return quote(text, safe="")


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


class HttpHandler:
    """Handler of the ``http`` builtin; holds one connection-pooling client, made lazily.

    Call ``aclose()`` when the handler is retired (reload, shutdown) to close its connections.
    """

    def __init__(self, config: HttpConfig) -> None:
        self.config = config
        self._url = Filler(config.url, quote=_quote_all)
        # Placeholders inside the authority: the input fields to blame for a refused host.
        authority = re.split(r"[/?#]", config.url.split("://", 1)[1], maxsplit=1)[0]
        self._host_fields = [f"input.{name}" for name in Filler(authority).names]
        self._client: httpx.AsyncClient | None = None

    def _client_for_loop(self) -> httpx.AsyncClient:
        # Created inside the running loop on first use: the handler is built before the
        # server's loop runs, and an httpx client belongs to the loop that first uses it.
        if self._client is None:
            self._client = httpx.AsyncClient(
                headers=self.config.headers,
                # A redirect could lead to a host that allowedHosts does not list.
                follow_redirects=False,
                # No ambient proxies or .netrc credentials: egress is what the manifest says.
                trust_env=False,
            )
        return self._client

    def _target(self, value: dict[str, Any]) -> tuple[httpx.URL, str]:
        """The rendered URL and its ``host:port``, or InvalidInput if it is not allowed."""
        rendered = self._url.fill(value)
        fields = self._host_fields or ["input"]
        try:
            url = httpx.URL(rendered)
        except httpx.InvalidURL as exc:
            raise InvalidInput([FieldViolation(f, f"makes an invalid url: {exc}")
                                for f in fields]) from None
        # Check the URL exactly as httpx parsed it: that is the host it will connect to.
        authority = effective_authority(url.scheme, url.host, url.port)
        if not url.host or not host_allowed(authority, self.config.allowed_hosts):
            raise InvalidInput([FieldViolation(f, f"makes url host {authority!r}, which is not "
                                                  "in allowedHosts") for f in fields])
        return url, authority

    async def __call__(self, value: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        """Make the request; the output is ``{status, headers, body}``."""
        url, authority = self._target(value)
        timeout = self.config.timeout_seconds
        remaining = ctx.time_remaining()
        # Which limit applies decides the error: the caller's deadline, or our own timeout.
        deadline_bound = remaining is not None and remaining <= timeout
        if remaining is not None and deadline_bound:
            timeout = remaining
        if timeout <= 0:
            raise DeadlineExceeded(f"http: no time left to call {authority}")
        client = self._client_for_loop()
        try:
            # httpx timeouts bound each phase (connect, each read); this bounds the whole call.
            async with asyncio.timeout(timeout):
                response = await client.request(
                    self.config.method,
                    url,
                    json=value if self.config.send_input else None,
                    timeout=timeout,
                )
        except (TimeoutError, httpx.TimeoutException):
            if deadline_bound:
                raise DeadlineExceeded(
                    f"http: {authority} did not answer before the deadline") from None
            raise Unavailable(
                f"http: cannot reach {authority}: no answer within {timeout:g}s") from None
        except httpx.TransportError as exc:
            # The URL is not in the message: its query may carry a secret; the host is enough.
            raise Unavailable(
                f"http: cannot reach {authority}: {type(exc).__name__}: {exc}") from None
        return {
            "status": response.status_code,
            # items() lower-cases names and joins repeated headers with ", ".
            "headers": dict(response.headers.items()),
            "body": self._body(response),
        }

    @staticmethod
    def _body(response: httpx.Response) -> Any:
        if _is_json(response.headers.get("content-type", "")):
            try:
                return response.json()
            except ValueError:
                pass  # says JSON but is not (or is empty, e.g. HEAD): hand over the text
        return response.text

    async def aclose(self) -> None:
        """Close the pooled connections; the handler makes a new client if called again."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
