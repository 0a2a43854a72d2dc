"""``packetflow controller`` (the routing controller) and ``packetflow approve NAME ID``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from prometheus_client import start_http_server

from packetflow.addresses import split_address
from packetflow.logs import configure_logging
from packetflow.manifests import load_paths
from packetflow.operator.client import ApiError
from packetflow.operator.routing.kube import APPROVE, PLURAL, REJECT, ControllerKube
from packetflow.operator.routing.loop import (
    KubernetesSink,
    Managed,
    PrintSink,
    RoutingController,
    managed_from_object,
    read_approvals,
    wants_control,
    write_approval,
)
from packetflow.operator.routing.prometheus import PrometheusReader
from packetflow.operator.routing.settings import ControllerSettings
from packetflow.serve import report
from packetflow.spec import API_VERSION, CapabilitySpec

log = logging.getLogger("packetflow.controller")

_FLAGS = {"prometheus_url": "prometheus_url", "interval": "controller_interval_seconds",
          "scrape_interval": "scrape_interval_seconds", "state_dir": "state_dir",
          "metrics_address": "controller_metrics_address"}


def settings_from(args: argparse.Namespace) -> ControllerSettings:
    """Settings from the environment, with the flags that were given on top."""
    overrides = {field: value for flag, field in _FLAGS.items()
                 if (value := getattr(args, flag, None)) is not None}
    if args.target and args.metrics_address is None:
        overrides["controller_metrics_address"] = ""  # a local preview serves no metrics
    return ControllerSettings(**overrides)


def reader_for(settings: ControllerSettings) -> PrometheusReader:
    """A Prometheus reader configured by ``settings``."""
    return PrometheusReader(settings.prometheus_url, step=settings.scrape_interval_seconds,
                            window=settings.rate_window, history=settings.history_seconds,
                            version_label=settings.version_label)


class TargetSource:
    """Target mode: manifests from files (re-read each tick), replicas as last decided."""

    def __init__(self, paths: list[Path], settings: ControllerSettings, sink: PrintSink):
        self.paths, self.settings, self.sink = paths, settings, sink

    def resources(self) -> tuple[list[Managed], dict[str | None, dict[str, CapabilitySpec]]]:
        """The managed resources now, and the capabilities they can see."""
        loaded = load_paths(self.paths)
        report(loaded.errors)
        approvals = read_approvals(self.settings.state_dir)
        out = []
        for manifest in loaded.manifests:
            spec = manifest.spec
            if not wants_control(spec):
                continue
            key = (manifest.kind, None, manifest.name)
            start = spec.replicas if spec.replicas is not None else (
                spec.scaling.min_replicas if spec.scaling is not None else 1)
            replicas = self.sink.replicas.get(key, start)
            marks = approvals.get(manifest.name, {})
            out.append(Managed(manifest.kind, None, manifest.name, spec, replicas, replicas,
                               marks.get("approve"), marks.get("reject")))
        return out, {None: {c.name: c.spec for c in loaded.capabilities}}


class ClusterSource:
    """Kubernetes mode: Capabilities and Actors listed in the namespaces (or all)."""

    def __init__(self, kube: ControllerKube, namespaces: list[str]) -> None:
        self.kube, self.namespaces = kube, namespaces

    async def resources(self) -> tuple[list[Managed],
                                       dict[str | None, dict[str, CapabilitySpec]]]:
        """The managed resources now, and each namespace's capabilities."""
        objects: list[dict[str, Any]] = []
        namespaces: list[str | None] = list(self.namespaces) or [None]
        for namespace in namespaces:
            for kind in ("Capability", "Actor"):
                objects += await self.kube.list_resources(kind, namespace)
        peers: dict[str | None, dict[str, CapabilitySpec]] = {}
        for obj in objects:
            if obj["kind"] != "Capability":
                continue
            with contextlib.suppress(ValueError):
                peers.setdefault(obj["metadata"].get("namespace"), {})[
                    obj["metadata"]["name"]] = CapabilitySpec.model_validate(obj.get("spec"))
        managed = [m for obj in objects if (m := managed_from_object(obj)) is not None]
        return managed, peers


async def run(args: argparse.Namespace, settings: ControllerSettings) -> int:
    """Tick until stopped (or once)."""
    reader = reader_for(settings)
    kube: ControllerKube | None = None
    printer = PrintSink()
    target = TargetSource(args.target or [], settings, printer)
    if not args.target:
        kube = ControllerKube()
        kube.login()
        cluster = ClusterSource(kube, list(args.namespace or []))
    controller = RoutingController(settings, reader,
                                   printer if kube is None else KubernetesSink(kube))
    if settings.controller_metrics_address:
        host, port = split_address(settings.controller_metrics_address)
        start_http_server(port, host, registry=controller.metrics.registry)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        while not stop.is_set():
            try:
                if kube is None:
                    resources, peers = target.resources()
                else:
                    resources, peers = await cluster.resources()
                await controller.tick(resources, peers)
            except ApiError as exc:
                log.warning("Kubernetes API: %s", exc)
                if exc.status == 401 and kube is not None:
                    kube.login()  # credentials rotated
            if args.once:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), settings.controller_interval_seconds)
    finally:
        await reader.aclose()
        if kube is not None:
            await kube.aclose()
    return 0


def cmd_controller(args: argparse.Namespace) -> int:
    """Run the routing controller (or preview it with --target)."""
    try:
        settings = settings_from(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    missing = [p for p in args.target or [] if not p.exists()]
    if missing:
        print(f"error: {missing[0]}: no such file or directory", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, "text" if args.target else settings.log_format)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per query is noise
    try:
        return asyncio.run(run(args, settings))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a crash must show as one line and a non-zero exit
        print(f"packetflow controller: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def cmd_approve(args: argparse.Namespace) -> int:
    """Approve (or reject) a recommendation: locally for a --target controller, or on
    Kubernetes by annotating the resource."""
    if args.namespace is None:
        settings = ControllerSettings(**({"state_dir": args.state_dir} if args.state_dir
                                         else {}))
        write_approval(settings.state_dir, args.name, args.id, reject=args.reject)
        print(f"{'rejected' if args.reject else 'approved'} {args.id} for {args.name} "
              f"(in {settings.state_dir})")
        return 0
    annotation = REJECT if args.reject else APPROVE

    async def annotate() -> None:
        kube = ControllerKube()
        try:
            kube.login()
            await kube.merge_patch(API_VERSION, args.kind, args.namespace, args.name,
                                   {"metadata": {"annotations": {annotation: args.id}}})
        finally:
            await kube.aclose()

    try:
        asyncio.run(annotate())
    except Exception as exc:  # ApiError, or kopf's LoginError: one line, exit 1
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{PLURAL[args.kind]}/{args.name} annotated {annotation}={args.id}")
    return 0


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``controller`` and ``approve`` (entry point group ``packetflow.commands``)."""
    parser = sub.add_parser(
        "controller", help="run the routing controller (or preview it with --target)",
        description="Scale Capabilities and Actors that declare scaling, steer canary "
                    "weights and list recommendations, from Prometheus metrics. Settings "
                    "come from PACKETFLOW_* variables; flags win.")
    parser.add_argument("--target", type=Path, action="append", metavar="PATH",
                        help="manifests (files or directories) to decide for, printing each "
                             "decision as a JSON line instead of writing to Kubernetes")
    parser.add_argument("--namespace", action="append", metavar="NS",
                        help="Kubernetes: decide in this namespace (repeatable; default all)")
    parser.add_argument("--prometheus-url", help="Prometheus HTTP API (default "
                        "$PACKETFLOW_PROMETHEUS_URL or http://127.0.0.1:9090)")
    parser.add_argument("--interval", type=float, help="seconds between decisions (default 15)")
    parser.add_argument("--scrape-interval", type=float,
                        help="Prometheus' scrape interval in seconds (default 15)")
    parser.add_argument("--metrics-address", metavar="HOST:PORT",
                        help="the controller's own /metrics (default 0.0.0.0:9466; off with "
                             "--target unless given; '' for none)")
    parser.add_argument("--state-dir", type=Path,
                        help="target mode: where `packetflow approve` leaves approvals "
                             "(default .packetflow)")
    parser.add_argument("--once", action="store_true", help="decide once and exit")
    parser.set_defaults(func=cmd_controller)

    approve = sub.add_parser("approve", help="approve (or reject) a recommendation",
                             description="Locally: for `packetflow controller --target`. With "
                                         "--namespace: annotate the resource on Kubernetes "
                                         f"({APPROVE}=ID or {REJECT}=ID).")
    approve.add_argument("name", help="the Capability or Actor")
    approve.add_argument("id", help="the recommendation's id (status.recommendations[].id)")
    approve.add_argument("--reject", action="store_true", help="reject it instead")
    approve.add_argument("--namespace", help="on Kubernetes (kubeconfig), in this namespace")
    approve.add_argument("--kind", choices=sorted(PLURAL), default="Capability",
                         help="with --namespace: the resource's kind (default Capability)")
    approve.add_argument("--state-dir", type=Path,
                         help="locally: the controller's state dir (default .packetflow)")
    approve.set_defaults(func=cmd_approve)
