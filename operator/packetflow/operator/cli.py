"""``packetflow operator``: run the Kubernetes operator (kopf) for Capabilities and Actors."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import kopf
from prometheus_client import start_http_server

from packetflow.operator.handlers import OperatorContext, run_operator
from packetflow.operator.heap import settle_heap
from packetflow.operator.settings import OperatorSettings


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host or "0.0.0.0", int(port)


def cmd_operator(args: argparse.Namespace) -> int:
    """Run the operator until SIGINT/SIGTERM; 0 on a clean stop."""
    overrides = {key: value for key in ("liveness_address", "operator_metrics_address")
                 if (value := getattr(args, key, None)) is not None}
    settings = OperatorSettings(**overrides)
    kopf.configure(verbose=settings.verbose,
                   log_format={"json": kopf.LogFormat.JSON, "plain": kopf.LogFormat.PLAIN,
                               "full": kopf.LogFormat.FULL}[settings.log_format])
    if settings.operator_metrics_address:
        host, port = _split_address(settings.operator_metrics_address)
        start_http_server(port, addr=host)
    liveness = None
    if settings.liveness_address:
        host, port = _split_address(settings.liveness_address)
        liveness = f"http://{host}:{port}/healthz"
    namespaces = list(args.namespace or [])
    ctx = OperatorContext.create(settings)
    settle_heap()
    try:
        asyncio.run(run_operator(ctx, namespaces=namespaces, clusterwide=not namespaces,
                                 liveness_endpoint=liveness))
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # a crash must show as one line and a non-zero exit
        logging.getLogger(__name__).error("operator stopped: %s", exc)
        print(f"packetflow operator: {exc}", file=sys.stderr)
        return 1
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``operator`` subcommand (found through the ``packetflow.commands`` entry point)."""
    parser = subparsers.add_parser(
        "operator", help="run the Kubernetes operator for Capabilities and Actors",
        description="Watch Capability and Actor objects and run each Capability as a "
                    "ConfigMap, Deployment and Service, each Actor as a ConfigMap, StatefulSet "
                    "and Services. Settings come from PACKETFLOW_* variables; flags win.")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--namespace", action="append", metavar="NS",
                       help="watch this namespace (repeatable)")
    scope.add_argument("--all-namespaces", action="store_true",
                       help="watch every namespace (the default without --namespace)")
    parser.add_argument("--liveness-address", metavar="HOST:PORT",
                        help="kopf's liveness endpoint, served at /healthz (default "
                             "0.0.0.0:8080; '' for none)")
    parser.add_argument("--metrics-address", dest="operator_metrics_address",
                        metavar="HOST:PORT",
                        help="operator Prometheus /metrics (default 0.0.0.0:9465; '' for none)")
    parser.set_defaults(func=cmd_operator)
