"""Run a runtime process: load manifests, serve gRPC and metrics, reload, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sqlite3
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn, Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

from packetflow.actors.runtime import ActorSystem
from packetflow.addresses import split_address
from packetflow.composition.resolve import current_namespace
from packetflow.composition.triggers import (
    IdempotencyStore,
    MemoryIdempotencyStore,
    PostgresIdempotencyStore,
    SqliteIdempotencyStore,
)
from packetflow.engine import Engine
from packetflow.feedback import FeedbackService, open_store
from packetflow.identity.spiffe import SpiffeId, SpiffeIdError
from packetflow.identity.tokens import TokenReviewer
from packetflow.identity.workload import WorkloadIdentity
from packetflow.identity.x509 import BundleError
from packetflow.manifests import ManifestError, load_paths, manifest_files
from packetflow.planner.core import Planner
from packetflow.planner.handler import PlanningServices, open_planning, runtime_planner
from packetflow.security import CallGuard, SecurityConfigError
from packetflow.server import RuntimeServer
from packetflow.settings import RuntimeSettings

log = logging.getLogger("packetflow.serve")

RELOAD_POLL_SECONDS = 1.0


def secure_engine(engine: Engine, settings: RuntimeSettings) -> CallGuard | None:
    """Turn zero trust on for ``engine`` when the settings give TLS files: a guard for its
    calls, mutual TLS as this workload for its remote calls. :class:`SecurityConfigError`
    names the setting or file at fault."""
    if settings.tls_cert is None or settings.tls_key is None or settings.tls_ca is None:
        return None
    try:
        identity = WorkloadIdentity(settings.tls_cert, settings.tls_key, settings.tls_ca)
    except BundleError as exc:
        raise SecurityConfigError(f"PACKETFLOW_TLS_*: {exc}") from None
    for index, text in enumerate(settings.trusted_forwarders):
        try:
            SpiffeId.parse(text)
        except SpiffeIdError as exc:
            raise SecurityConfigError(f"trusted_forwarders[{index}]: {exc}") from None
    workload = identity.workload
    guard = CallGuard(identity, engine.metrics,
                      home_namespace=workload.namespace if workload else current_namespace(),
                      default_policy=settings.default_policy,
                      trusted_forwarders=settings.trusted_forwarders)
    if settings.token_address is not None:
        guard.tokens = TokenReviewer.in_cluster(identity.trust_domain, settings.token_review_api)
    engine.guard = guard
    engine.remote.secure(identity, forward_caller=settings.forward_caller)
    return guard


def start_metrics_server(registry: CollectorRegistry, address: str) -> tuple[WSGIServer, int]:
    """Serve ``/metrics`` on its own port, off the event loop (prometheus-client's thread)."""
    host, port = split_address(address)
    server, _thread = start_http_server(port, host, registry=registry)
    return server, server.server_port


def report(errors: Sequence[ManifestError]) -> None:
    """Print manifest errors for a person: one per line, with file, line and path."""
    for error in errors:
        print(f"error: {error}", file=sys.stderr)


async def idempotency_store(settings: RuntimeSettings) -> IdempotencyStore:
    """Where trigger event keys live: the shared PostgreSQL when configured, else SQLite
    under the state dir, else (not writable) memory, where a duplicate arriving after a
    restart could run again."""
    if settings.trigger_store_dsn:
        try:
            return await PostgresIdempotencyStore.connect(
                settings.trigger_store_dsn, lease_seconds=settings.trigger_lease_seconds)
        except Exception as exc:  # psycopg's errors: the DSN or the server
            raise SystemExit(
                f"error: trigger store (PACKETFLOW_TRIGGER_STORE_DSN): {exc}") from None
    try:
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        return SqliteIdempotencyStore(settings.state_dir / "triggers.db",
                                      lease_seconds=settings.trigger_lease_seconds)
    except (OSError, sqlite3.Error) as exc:
        log.warning("state dir %s is not usable (%s): trigger keys kept in memory only",
                    settings.state_dir, exc)
        return MemoryIdempotencyStore()


def actor_system(engine: Engine, settings: RuntimeSettings,
                 observer: bool = False) -> ActorSystem:
    """The actor runtime: state under ``settings.state_dir``, so a restarted dev finds it;
    an ``observer`` (no address to be reached at) forwards to the members instead of joining."""
    return ActorSystem(engine, state_dir=settings.state_dir, member_id=settings.member_id,
                       address=settings.advertise_address or settings.address,
                       observer=observer)


def _snapshot(paths: Sequence[Path]) -> dict[Path, float]:
    return {p: p.stat().st_mtime for p in manifest_files(paths) if p.exists()}


async def load_runtime(paths: Sequence[Path], settings: RuntimeSettings, *,
                       observer: bool = False,
                       ) -> tuple[Engine, ActorSystem, list[ManifestError]]:
    """The manifests under ``paths`` as an engine and an actor system, and every load error
    (what ``dev``, ``runtime`` and ``mcp --stdio`` all serve)."""
    loaded = load_paths(paths)
    engine = Engine(loaded.capabilities, max_payload_bytes=settings.max_payload_bytes,
                    idempotency=await idempotency_store(settings),
                    undeclared_as_services=settings.undeclared_as_services)
    try:
        secure_engine(engine, settings)
    except SecurityConfigError as exc:
        await engine.aclose()
        raise SystemExit(f"error: zero trust: {exc}") from None
    actors = actor_system(engine, settings, observer)
    errors = [*loaded.errors, *engine.load_errors, *await engine.verify_remotes(),
              *await actors.replace(loaded.actors)]
    return engine, actors, errors


async def feedback_and_planner(engine: Engine, settings: RuntimeSettings
                               ) -> tuple[FeedbackService, PlanningServices, Planner]:
    """The feedback service, the planning services (shared by planner capabilities, set on
    the engine) and the planner behind ``Plan``, ``PlanAndExecute`` and the MCP tools."""
    feedback = FeedbackService(
        await open_store(settings.state_dir, settings.feedback_store_dsn),
        engine.metrics.registry, engine.traces)
    planning = await open_planning(settings.state_dir, feedback.store, engine.metrics.registry)
    engine.planning = planning
    planner = runtime_planner(planning, engine.capabilities, engine.invoke_routed,
                              engine.remote, engine.step_metrics)
    return feedback, planning, planner


async def serve(paths: Sequence[Path], settings: RuntimeSettings, *, watch: bool,
                strict: bool, on_ready: Callable[[RuntimeServer, int | None], None]) -> int:
    """Serve the manifests under ``paths`` until SIGINT/SIGTERM; returns an exit code.

    ``strict`` refuses to start on any manifest error (pods); otherwise errors are reported and
    the valid manifests still serve (``packetflow dev``). ``watch`` reloads on file changes.
    """
    # Taken before loading: a file written after the load (even before the reloader's first
    # poll, right after readiness is announced) differs from it, so it is never missed.
    seen = await asyncio.to_thread(_snapshot, paths) if watch else None
    engine, actors, errors = await load_runtime(paths, settings)
    report(errors)
    if strict and errors:
        await actors.aclose()
        await engine.aclose()
        return 1
    feedback, planning, planner = await feedback_and_planner(engine, settings)
    server = await RuntimeServer.start(engine, settings.address, actors, feedback, planner,
                                       health_address=settings.health_address,
                                       token_address=settings.token_address)
    mcp_server = None
    if settings.mcp_address:
        from packetflow.mcp.http import start_mcp  # MCP's web stack loads only when it is on
        mcp_server = await start_mcp(engine, settings, actors, planner, feedback)
    metrics_server, metrics_port = (
        start_metrics_server(engine.metrics.registry, settings.metrics_address)
        if settings.metrics_address else (None, None))
    engine.start_triggers()
    stop = stop_on_signal()
    on_ready(server, metrics_port)
    reloader = (asyncio.create_task(_reload_on_change(paths, seen, engine, actors))
                if seen is not None else None)
    try:
        await drain_after(stop, server, settings.drain_seconds, settings.grace_seconds)
    finally:
        if reloader is not None:
            reloader.cancel()
            # Let it finish before the actors close, so a reload never races the shutdown.
            await asyncio.gather(reloader, return_exceptions=True)
        if metrics_server is not None:
            metrics_server.shutdown()
        if mcp_server is not None:
            await mcp_server.stop()
        await actors.aclose()
        await engine.aclose()
        await planner.aclose()
        await planning.aclose()
        await feedback.aclose()
    return 0


def exit_now(code: int) -> NoReturn:
    """End a server process right after :func:`serve` returned: it closed everything it
    opened, and the interpreter's own teardown (a full garbage collection over the loaded
    models and modules, seconds on a busy machine) would only delay every Ctrl-C, restart and
    pod termination."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


class Drainable(Protocol):
    """A server that stops by draining (a runtime, the gateway)."""

    async def stop(self, grace: float = 30.0, drain: float = 0.0) -> None:
        """Report NOT_SERVING for ``drain`` seconds, then let calls finish within ``grace``."""


def stop_on_signal() -> asyncio.Event:
    """An event SIGINT or SIGTERM sets; install it before announcing readiness, so a signal
    right after the announcement drains instead of killing."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def drain_after(stop: asyncio.Event, server: Drainable, drain_seconds: float,
                      grace_seconds: float) -> None:
    """Wait for ``stop``, then drain ``server``."""
    await stop.wait()
    log.info("draining", extra={"drain_seconds": drain_seconds, "grace_seconds": grace_seconds})
    await server.stop(grace=grace_seconds, drain=drain_seconds)


async def _reload_on_change(paths: Sequence[Path], seen: dict[Path, float], engine: Engine,
                            actors: ActorSystem | None = None) -> None:
    """Poll manifest files' mtimes; on a change from ``seen`` (what was loaded), reload
    and swap the registry."""
    while True:
        await asyncio.sleep(RELOAD_POLL_SECONDS)
        try:
            now = await asyncio.to_thread(_snapshot, paths)
            if now == seen:
                continue
            seen = now
            loaded = await asyncio.to_thread(load_paths, paths)
            errors = [*loaded.errors, *engine.replace(loaded.capabilities),
                      *await engine.verify_remotes()]
            if actors is not None:  # changed actor types restart; state stays in the store
                errors += await actors.replace(loaded.actors)
        except Exception:  # one failed reload must not end reloading: log, keep polling
            log.exception("reload failed; still watching for changes")
            continue
        report(errors)
        log.info("reloaded", extra={"capabilities": len(engine.served), "errors": len(errors)})
