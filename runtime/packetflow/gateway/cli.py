"""``packetflow gateway``: one gRPC address in front of every capability and actor type."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from packetflow.gateway.metrics import GatewayMetrics
from packetflow.gateway.routes import RoutesError, load_routes
from packetflow.gateway.routing import Routes
from packetflow.gateway.server import GatewayServer
from packetflow.gateway.settings import GatewaySettings
from packetflow.identity.tokens import TokenReviewer
from packetflow.identity.x509 import BundleError
from packetflow.logs import configure_logging
from packetflow.serve import drain_after, exit_now, start_metrics_server, stop_on_signal

log = logging.getLogger("packetflow.gateway")

RELOAD_POLL_SECONDS = 0.5


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add the ``gateway`` subcommand (entry point group ``packetflow.commands``)."""
    parser = sub.add_parser(
        "gateway", help="one gRPC address in front of every capability and actor type",
        description="Route each call to the best backend: peak-EWMA balancing, outlier "
                    "ejection, retries within a budget, hedging and canary weights. Backends "
                    "come from --routes FILE (reloaded on change) or, with --kubernetes, from "
                    "Capabilities, Actors and their EndpointSlices.")
    parser.add_argument("--address", help="gRPC listen address (default 127.0.0.1:50051)")
    parser.add_argument("--metrics-address",
                        help="Prometheus listen address (default 127.0.0.1:9464; '' for none)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--routes", type=Path, metavar="FILE",
                        help="routes file: capability -> backends (reloaded on change)")
    source.add_argument("--kubernetes", action="store_true", default=None,
                        help="discover backends through the Kubernetes API (in-cluster)")
    parser.add_argument("--namespace", action="append", metavar="NS",
                        help="with --kubernetes: serve this namespace (repeatable; "
                             "default all)")
    tls = parser.add_argument_group(
        "mutual TLS (zero trust: callers and backends alike; all three or none)")
    tls.add_argument("--cert", type=Path, help="the gateway's certificate (PEM, a SPIFFE ID)")
    tls.add_argument("--key", type=Path, help="its private key (PEM)")
    tls.add_argument("--ca", type=Path, help="the trust domain's authorities (PEM)")
    tls.add_argument("--health-address",
                     help="plaintext gRPC health only, beside the mTLS port (kubelet probes)")
    tls.add_argument("--token-address",
                     help="a second listener (TLS, no client certificate) where each call "
                          "proves its caller with a projected ServiceAccount token "
                          "(authorization: Bearer, audience packetflow; TokenReview)")
    tls.add_argument("--token-review-api", metavar="URL",
                     help="the Kubernetes API that reviews tokens (default: in-cluster)")
    parser.set_defaults(func=cmd_gateway)


def settings_from(args: argparse.Namespace) -> GatewaySettings:
    """Settings from the environment, flags on top."""
    flags = {"address": args.address, "metrics_address": args.metrics_address,
             "gateway_routes": args.routes, "gateway_kubernetes": args.kubernetes,
             "gateway_namespaces": args.namespace, "tls_cert": args.cert,
             "tls_key": args.key, "tls_ca": args.ca, "health_address": args.health_address,
             "token_address": args.token_address, "token_review_api": args.token_review_api}
    return GatewaySettings(**{k: v for k, v in flags.items() if v is not None})


def cmd_gateway(args: argparse.Namespace) -> int:
    """Run the gateway until SIGINT/SIGTERM."""
    try:
        settings = settings_from(args)
    except ValidationError as exc:
        for error in exc.errors():
            print(f"error: {error['msg'].removeprefix('Value error, ')}", file=sys.stderr)
        return 2
    if settings.gateway_routes is None and not settings.gateway_kubernetes:
        print("error: give --routes FILE or --kubernetes", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    exit_now(asyncio.run(serve_gateway(settings)))


async def serve_gateway(settings: GatewaySettings) -> int:
    """Serve until SIGINT/SIGTERM; returns an exit code."""
    metrics = GatewayMetrics()
    routes: Routes | None = None
    discover: Callable[[GatewayServer], Awaitable[None]]
    if settings.gateway_routes is not None:
        path = settings.gateway_routes
        loaded = _stamp(path)  # before loading: a change made meanwhile is still a change
        try:
            routes = load_routes(path)
        except RoutesError as exc:
            for error in exc.errors:
                print(f"error: {error}", file=sys.stderr)
            return 1

        async def discover(server: GatewayServer) -> None:
            await watch_routes_file(path, server.apply, loaded)
        where = f"routes from {path}"
    else:
        # Imported here: only Kubernetes mode needs the API client.
        from packetflow.gateway.kube import KubeDiscovery

        discovery = KubeDiscovery.from_settings(settings)

        async def discover(server: GatewayServer) -> None:
            await discovery.run(server.apply)
        namespaces = ", ".join(settings.gateway_namespaces) or "all namespaces"
        where = f"Kubernetes ({namespaces})"
    try:
        identity = settings.workload_identity()
    except BundleError as exc:
        print(f"error: PACKETFLOW_TLS_* (--cert/--key/--ca): {exc}", file=sys.stderr)
        return 1
    tokens = TokenReviewer.in_cluster(identity.trust_domain, settings.token_review_api) \
        if identity is not None and settings.token_address is not None else None
    server = await GatewayServer.start(settings.address, routes=routes, metrics=metrics,
                                       max_payload_bytes=settings.max_payload_bytes,
                                       identity=identity,
                                       health_address=settings.health_address,
                                       token_address=settings.token_address, tokens=tokens)
    metrics_server, metrics_port = (
        start_metrics_server(metrics.registry, settings.metrics_address)
        if settings.metrics_address else (None, None))
    stop = stop_on_signal()
    extra = f", metrics on :{metrics_port}/metrics" if metrics_port else ""
    if identity is not None:
        extra += f", mutual TLS as {identity.spiffe_id}"
    if server.token_listener is not None:
        extra += f", ServiceAccount tokens on port {server.token_listener.port}"
    print(f"packetflow: gateway on port {server.port}, {where}{extra}", file=sys.stderr,
          flush=True)
    discovering = asyncio.create_task(discover(server))
    try:
        await drain_after(stop, server, settings.drain_seconds, settings.grace_seconds)
    finally:
        discovering.cancel()
        await asyncio.gather(discovering, return_exceptions=True)
        if metrics_server is not None:
            metrics_server.shutdown()
    return 0


async def watch_routes_file(path: Path, apply: Callable[[Routes], None],
                            seen: tuple[float, int] | None) -> None:
    """Reload the routes file when it changes from ``seen`` (what was loaded); a bad version
    is reported and the routes before it keep serving."""
    while True:
        await asyncio.sleep(RELOAD_POLL_SECONDS)
        stamp = _stamp(path)
        if stamp == seen:
            continue
        seen = stamp
        try:
            routes = await asyncio.to_thread(load_routes, path)
        except RoutesError as exc:
            for error in exc.errors:
                log.error("routes not reloaded: %s", error, extra={"file": str(path)})
            continue
        apply(routes)
        log.info("routes reloaded", extra={"file": str(path),
                                           "capabilities": len(routes.capabilities),
                                           "actors": len(routes.actors)})


def _stamp(path: Path) -> tuple[float, int] | None:
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_mtime, status.st_size
