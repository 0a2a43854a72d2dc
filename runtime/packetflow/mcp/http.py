"""MCP over streamable HTTP at ``/mcp``: stateless, Host/Origin checks on loopback, bearer token,
and under zero trust HTTPS with client certificates.

Stateless mode gives every POST a fresh transport and keeps no session, so any replica behind
a Kubernetes Service can answer any request: no sticky sessions needed. uvicorn runs inside the
caller's event loop (the runtime's), driven through its public ``startup``/``main_loop``/
``shutdown`` rather than ``serve``, which would take over SIGTERM from the runtime.

Under zero trust (the runtime's workload identity) the endpoint speaks TLS 1.3 and each
connection's client certificate is authenticated once, as it opens; every request on it
carries the outcome in its ASGI scope (:data:`PROOF_SCOPE_KEY`), requests of a connection that
proved nobody get 401 saying why, and tool calls run as the proven caller. With a token
reviewer (``PACKETFLOW_MCP_TOKEN_REVIEW``), a request on a connection without a client
certificate may prove its caller with a projected ServiceAccount token instead
(``Authorization: Bearer``, TokenReview, :mod:`packetflow.identity.tokens`); a certificate,
when presented, decides alone. ``PACKETFLOW_MCP_TOKEN`` is another thing: one shared secret
every client sends, proving no identity (the two cannot be combined: both are bearer tokens).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import math
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

import orjson
import uvicorn
from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from packetflow.actors.runtime import ActorSystem
from packetflow.addresses import split_address
from packetflow.engine import Engine
from packetflow.feedback import FeedbackService
from packetflow.identity.tokens import TokenReviewer
from packetflow.identity.workload import Principal, WorkloadIdentity
from packetflow.identity.x509 import AuthenticationError
from packetflow.mcp.planner import planner_source
from packetflow.mcp.server import PROOF_SCOPE_KEY, McpService
from packetflow.planner.core import Planner
from packetflow.settings import RuntimeSettings

log = logging.getLogger("packetflow.mcp.http")

MCP_PATH = "/mcp"
ALPN_HTTP1 = "http/1.1"  # uvicorn's h11 protocol
LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts local connections (where DNS rebinding is the threat)."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def transport_security(host: str) -> TransportSecuritySettings | None:
    """The SDK's DNS-rebinding protection for a loopback listener; ``None`` (off) otherwise.

    On a pod address clients arrive through Service names nobody can list in advance, and
    the bearer token is the protection there.
    """
    if not is_loopback(host):
        return TransportSecuritySettings(enable_dns_rebinding_protection=False)
    hosts = ["127.0.0.1", "localhost", "[::1]"]
    if host not in ("127.0.0.1", "localhost", "::1"):
        hosts.append(host)
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[f"{h}:*" for h in hosts],
        allowed_origins=[f"http://{h}:*" for h in hosts])


class BearerTokenGate:
    """ASGI middleware: HTTP requests without ``Authorization: Bearer <token>`` get 401.

    It wraps the whole MCP app, so a refused request reaches no MCP code at all.
    """

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self._authorized(scope):
            await self._refuse(send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        for key, value in scope["headers"]:
            if key == b"authorization":
                # Constant-time: the token must not leak through response timing.
                return hmac.compare_digest(value, self.expected)
        return False

    @staticmethod
    async def _refuse(send: Send) -> None:
        await unauthorized(send, "a valid bearer token is required",
                           b'Bearer realm="packetflow", error="invalid_token"')


async def unauthorized(send: Send, description: str, challenge: bytes) -> None:
    """Answer 401 with a JSON body saying why."""
    body = orjson.dumps({"error": "unauthorized", "error_description": description})
    await send({"type": "http.response.start", "status": 401, "headers": [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"www-authenticate", challenge)]})
    await send({"type": "http.response.body", "body": body})


class CertificateGate:
    """ASGI middleware under mutual TLS: a request on a connection whose client certificate
    proved nobody gets 401 naming the reason, and reaches no MCP code. With ``tokens``, a
    request on a connection without a certificate proves its caller with its ServiceAccount
    bearer token instead (reviewed; the request's proof becomes that caller)."""

    def __init__(self, app: ASGIApp, tokens: TokenReviewer | None = None) -> None:
        self.app = app
        self.tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            proof = scope.get(PROOF_SCOPE_KEY)
            if self.tokens is not None and not isinstance(proof, Principal) and (
                    proof is None or proof.reason == "no-client-certificate"):
                proof = scope[PROOF_SCOPE_KEY] = await self._token_proof(scope)
            reason = None
            if isinstance(proof, AuthenticationError):
                reason = proof.message
            elif not isinstance(proof, Principal):
                reason = "the connection carries no client certificate"
            elif proof.not_after is not None and time.time() > proof.not_after:
                reason = f"the client certificate of {proof.caller} expired"  # kept-alive
            if reason is not None:
                challenge = b'Bearer realm="packetflow", error="invalid_token"' \
                    if self.tokens is not None else b'Mutual realm="packetflow"'
                await unauthorized(send, reason, challenge)
                return
        await self.app(scope, receive, send)

    async def _token_proof(self, scope: Scope) -> Principal | AuthenticationError:
        assert self.tokens is not None
        for key, value in scope["headers"]:
            if key == b"authorization" and value[:7].lower() == b"bearer ":
                try:
                    return await self.tokens.review(value[7:].strip().decode("latin-1"))
                except AuthenticationError as exc:
                    log.info("MCP caller refused", extra={"reason": exc.reason,
                                                          "detail": exc.message})
                    return exc
        return AuthenticationError("no-credentials", "the request carries neither a client "
                                   "certificate nor a bearer token")


class _WithProof:
    """The app of one connection: every request's scope carries the connection's proof."""

    def __init__(self, app: ASGIApp, proof: Principal | AuthenticationError) -> None:
        self.app = app
        self.proof = proof

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[PROOF_SCOPE_KEY] = self.proof
        await self.app(scope, receive, send)


def proving_protocol(identity: WorkloadIdentity) -> type[H11Protocol]:
    """uvicorn's HTTP/1.1 protocol, authenticating each TLS connection's client certificate
    as it opens (the handshake is done by then)."""

    class Proving(H11Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)  # type: ignore[arg-type]
            ssl_object = transport.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            proof: Principal | AuthenticationError
            try:
                proof = identity.authenticate(der)
            except AuthenticationError as exc:
                log.info("MCP caller refused", extra={"reason": exc.reason,
                                                      "detail": exc.message})
                proof = exc
            self.app = _WithProof(self.app, proof)

    return Proving


def build_app(service: McpService, host: str, token: str | None,
              mutual_tls: bool = False, tokens: TokenReviewer | None = None) -> ASGIApp:
    """The ASGI app: the SDK's streamable HTTP endpoint, behind the token gate if any (and the
    certificate gate under mutual TLS, accepting ServiceAccount tokens with ``tokens``)."""
    app: ASGIApp = service.server.streamable_http_app(
        streamable_http_path=MCP_PATH, stateless_http=True, host=host,
        transport_security=transport_security(host))
    if token:
        app = BearerTokenGate(app, token)
    return CertificateGate(app, tokens) if mutual_tls else app


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket whose connections get TCP_NODELAY.

    asyncio sets TCP_NODELAY only on sockets whose ``proto`` is IPPROTO_TCP, and
    ``socket.create_server`` leaves it 0: Nagle's algorithm then holds each SSE response's
    last small write until the client's delayed ACK, about 40 ms a call on Linux.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass
class McpHttpServer:
    """A running streamable HTTP endpoint (uvicorn in the current event loop)."""

    server: uvicorn.Server
    sock: socket.socket
    loop_task: asyncio.Task[Any]
    host: str
    port: int
    scheme: str = "http"
    tokens: TokenReviewer | None = None

    @property
    def url(self) -> str:
        """Where clients connect."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{MCP_PATH}"

    @classmethod
    async def start(cls, service: McpService, address: str = "127.0.0.1:0",
                    token: str | None = None, grace: float = 5.0,
                    identity: WorkloadIdentity | None = None,
                    tokens: TokenReviewer | None = None) -> McpHttpServer:
        """Listen on ``address`` (port 0 picks a free one) and serve until ``stop``; with
        ``identity``, HTTPS as that workload, callers proven by their certificates (or, with
        ``tokens``, which the server then owns, by ServiceAccount tokens)."""
        if token and tokens is not None:
            raise ValueError("a static MCP token and ServiceAccount tokens exclude each other")
        host, port = split_address(address)
        tls: dict[str, Any] = {} if identity is None else {
            "http": proving_protocol(identity),
            "ssl_context_factory":
                lambda config, default: identity.rotating_server_context(ALPN_HTTP1)}
        config = uvicorn.Config(build_app(service, host, token, identity is not None, tokens),
                                lifespan="on", ws="none", log_config=None, access_log=False,
                                timeout_graceful_shutdown=max(math.ceil(grace), 1), **tls)
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        sock = listen_socket(host, port)
        try:
            await server.startup(sockets=[sock])
        except BaseException:
            sock.close()
            raise
        if server.should_exit:  # the app's lifespan (the SDK session manager) failed
            sock.close()
            raise OSError(f"MCP server on {address} failed to start")
        actual = sock.getsockname()[1]
        log.info("mcp listening", extra={"address": address, "port": actual,
                                          "auth": token is not None})
        task = asyncio.get_running_loop().create_task(server.main_loop())
        return cls(server, sock, task, host, actual, "http" if identity is None else "https",
                   tokens)

    async def stop(self) -> None:
        """Stop accepting, let calls in flight finish (up to the grace period), close."""
        self.server.should_exit = True
        await self.loop_task
        await self.server.shutdown(sockets=[self.sock])
        if self.tokens is not None:
            await self.tokens.aclose()


async def start_mcp(engine: Engine, settings: RuntimeSettings,
                    actors: ActorSystem | None = None, planner: Planner | None = None,
                    feedback: FeedbackService | None = None) -> McpHttpServer:
    """Serve the runtime's capabilities and actor types (and the planner's tools) at
    ``settings.mcp_address`` and announce the URL."""
    assert settings.mcp_address is not None
    service = McpService.for_runtime(engine, actors)
    for source in planner_source(planner, feedback, engine.traces):
        service.add_source(source)
    identity = engine.guard.identity if engine.guard is not None else None
    tokens = TokenReviewer.in_cluster(identity.trust_domain, settings.token_review_api) \
        if identity is not None and settings.mcp_token_review else None
    server = await McpHttpServer.start(service,
                                       settings.mcp_address, token=settings.mcp_token,
                                       grace=settings.grace_seconds, identity=identity,
                                       tokens=tokens)
    auth = " (bearer token required)" if settings.mcp_token else ""
    if identity is not None:
        auth += " (client certificate or ServiceAccount token required)" if tokens \
            else " (client certificate required)"
    print(f"packetflow: MCP on {server.url} port {server.port}{auth}", file=sys.stderr,
          flush=True)
    return server
