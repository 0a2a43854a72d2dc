"""The ``packetflow`` command: serve manifests, call capabilities, validate files.

Client commands (``call``, ``send``, ``list``, ``describe``, ``actors``) import only the gRPC
client, so they answer in a blink; server commands import the runtime when they run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from packetflow import __version__

if TYPE_CHECKING:
    from packetflow.client import ProgressEvent, RuntimeClient
    from packetflow.graph import Mesh, Stats
    from packetflow.manifests import ManifestError
    from packetflow.server import RuntimeServer
    from packetflow.settings import RuntimeSettings
    from packetflow.spec import Capability

DEFAULT_ADDRESS = "127.0.0.1:50051"
# Commands that only talk to a runtime: they load no plugin and none of the server side.
CLIENT_COMMANDS = frozenset({"call", "send", "list", "describe", "actors"})


def _print_json(value: Any) -> None:
    option = orjson.OPT_INDENT_2 if sys.stdout.isatty() else 0
    sys.stdout.write(orjson.dumps(value, option=option).decode() + "\n")


def _address_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=os.environ.get("PACKETFLOW_ADDRESS", DEFAULT_ADDRESS),
                        help="runtime gRPC address (default: $PACKETFLOW_ADDRESS or %(default)s)")
    tls = parser.add_argument_group("mutual TLS (a runtime with zero trust on)")
    tls.add_argument("--cert", type=Path, help="your certificate (PEM, a SPIFFE ID)")
    tls.add_argument("--key", type=Path, help="its private key (PEM)")
    tls.add_argument("--ca", type=Path, help="the authorities the runtime's certificate "
                                             "chains to (PEM)")


def _serve_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="gRPC listen address (default 127.0.0.1:50051)")
    parser.add_argument("--metrics-address",
                        help="Prometheus listen address (default 127.0.0.1:9464; '' for none)")
    parser.add_argument("--max-payload-bytes", type=int, help="largest accepted input")
    parser.add_argument("--state-dir", type=Path,
                        help="durable local state: trigger keys, actors (default .packetflow)")
    parser.add_argument("--mcp-address",
                        help="serve MCP (streamable HTTP, path /mcp) here; default: off")


def _settings(args: argparse.Namespace) -> RuntimeSettings:
    from packetflow.settings import RuntimeSettings

    overrides = {key: value for key in ("address", "metrics_address", "max_payload_bytes",
                                        "state_dir", "mcp_address")
                 if (value := getattr(args, key, None)) is not None}
    return RuntimeSettings(**overrides)


def _dev_mtls(settings: RuntimeSettings) -> RuntimeSettings:
    """``dev --mtls``: a local authority and certificates under the state dir, served."""
    from packetflow.identity.local import dev_identity

    server, client = dev_identity(settings.state_dir / "tls")
    print(f"packetflow: mutual TLS on; call as the developer with {client.flags()}",
          file=sys.stderr, flush=True)
    return settings.model_copy(update={"tls_cert": server.cert, "tls_key": server.key,
                                       "tls_ca": server.ca})


def _announce(server: RuntimeServer, metrics_port: int | None) -> None:
    actor_types = server.actors.types if server.actors is not None else {}
    names = ", ".join(sorted([*server.engine.served, *actor_types])) or "nothing"
    metrics = f", metrics on :{metrics_port}/metrics" if metrics_port else ""
    print(f"packetflow: serving {names} on port {server.port}{metrics}", file=sys.stderr,
          flush=True)


def cmd_dev(args: argparse.Namespace) -> int:
    """Serve every manifest under DIR in one process, reloading on change."""
    from packetflow.logs import configure_logging
    from packetflow.serve import exit_now, serve

    settings = _settings(args)
    if args.mtls:
        settings = _dev_mtls(settings)
    configure_logging(settings.log_level, "text")
    # Python implementations are imported from the current directory and the manifest dirs.
    for path in [Path.cwd(), *args.paths]:
        sys.path.insert(0, str(path if path.is_dir() else path.parent))
    exit_now(asyncio.run(serve(args.paths, settings, watch=not args.no_reload, strict=False,
                               on_ready=_announce)))


def cmd_runtime(args: argparse.Namespace) -> int:
    """Serve a spec bundle as a pod does: strict, JSON logs, drain on SIGTERM."""
    from packetflow.logs import configure_logging
    from packetflow.serve import exit_now, serve

    settings = _settings(args)
    configure_logging(settings.log_level, settings.log_format)
    exit_now(asyncio.run(serve([args.bundle], settings, watch=args.reload, strict=True,
                               on_ready=_announce)))


def read_data(text: str, flag: str = "--data") -> Any:
    """The JSON value of ``--data``: inline JSON, ``@FILE`` or ``-`` (standard input), as
    curl and grpcurl take it; ``DataError`` names the flag and the file."""
    if text == "-":
        where, raw = "standard input", sys.stdin.buffer.read()
    elif text.startswith("@"):
        where = text[1:]
        try:
            raw = Path(where).read_bytes()
        except OSError as exc:
            raise DataError(f"{flag} {text}: cannot read {where}: {exc.strerror}") from None
    else:
        where, raw = "", text.encode()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        source = f" ({where})" if where else ""
        raise DataError(f"{flag} is not valid JSON{source}: {exc}") from None


class DataError(Exception):
    """``--data`` could not be read or parsed (exit code 2)."""


def _client_call(args: argparse.Namespace,
                 action: Callable[[RuntimeClient], Any]) -> int:
    from packetflow.client import CallError, RuntimeClient, TlsFilesError, tls_credentials

    try:
        credentials = tls_credentials(args.cert, args.key, args.ca)
    except TlsFilesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    async def run() -> int:
        async with RuntimeClient(args.address, credentials=credentials) as client:
            try:
                await action(client)
            except CallError as exc:
                print(f"error: {exc}", file=sys.stderr)
                for violation in exc.violations:
                    print(f"  {violation}", file=sys.stderr)
                if exc.trace_id:
                    print(f"  trace id: {exc.trace_id}", file=sys.stderr)
                if exc.execution_trace is not None:
                    print(orjson.dumps(exc.execution_trace, option=orjson.OPT_INDENT_2).decode(),
                          file=sys.stderr)
                return 1
        return 0

    return asyncio.run(run())


def cmd_call(args: argparse.Namespace) -> int:
    """Call a capability and print its output as JSON."""
    try:
        value = read_data(args.data)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def progress(event: ProgressEvent) -> None:
        share = f" ({event.fraction:.0%})" if event.fraction >= 0 else ""
        print(f"progress: {event.message}{share}", file=sys.stderr)

    async def action(client: RuntimeClient) -> None:
        if args.trace:
            result, trace = await client.invoke_traced(args.name, value, timeout=args.timeout,
                                                       wait_for_ready=args.wait)
            _print_json(result)
            if trace is not None:
                print(orjson.dumps(trace, option=orjson.OPT_INDENT_2).decode(), file=sys.stderr)
            return
        if args.stream:
            result = await client.invoke_stream(args.name, value, timeout=args.timeout,
                                                on_progress=progress, wait_for_ready=args.wait)
        else:
            result = await client.invoke(args.name, value, timeout=args.timeout,
                                         wait_for_ready=args.wait)
        _print_json(result)

    return _client_call(args, action)


def cmd_list(args: argparse.Namespace) -> int:
    """List what a runtime serves: capabilities (name, implementation, intent) and actor
    types (name, ``actor``, intent)."""
    from packetflow.client import CallError

    async def action(client: RuntimeClient) -> None:
        if args.kind in (None, "capability"):
            for cap in await client.list():
                print(f"{cap.name}\t{cap.implementation}\t{cap.intent}")
        if args.kind in (None, "actor"):
            try:
                types = await client.list_actor_types()
            except CallError as exc:
                if exc.code.name != "UNIMPLEMENTED" or args.kind == "actor":
                    raise
                types = []  # a runtime serving no actors has no ActorRuntime service
            for kind in types:
                print(f"{kind.name}\tactor\t{kind.intent}")

    return _client_call(args, action)


def cmd_describe(args: argparse.Namespace) -> int:
    """Print a capability's (or else an actor type's) contract as JSON."""
    from packetflow.client import CallError

    async def action(client: RuntimeClient) -> None:
        try:
            _print_json(await client.describe(args.name))
        except CallError as exc:
            if exc.code.name != "NOT_FOUND":
                raise
            try:
                _print_json(await client.describe_actor_type(args.name))
            except CallError as actor_exc:
                if actor_exc.code.name not in ("NOT_FOUND", "UNIMPLEMENTED"):
                    raise
                raise CallError(exc.code, f"no capability or actor type {args.name!r}") \
                    from None

    return _client_call(args, action)


def cmd_send(args: argparse.Namespace) -> int:
    """Send a message to an actor and print its reply as JSON."""
    try:
        value = read_data(args.data)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    async def action(client: RuntimeClient) -> None:
        _print_json(await client.send(args.type, args.id, value, message_id=args.message_id,
                                      timeout=args.timeout, wait_for_ready=args.wait))

    return _client_call(args, action)


def cmd_actors_list(args: argparse.Namespace) -> int:
    """List the actors of a type: id, version, whether active."""
    async def action(client: RuntimeClient) -> None:
        for actor in await client.list_actors(args.type):
            print(f"{actor['id']}\t{actor['version']}\t{'active' if actor['active'] else ''}")

    return _client_call(args, action)


def cmd_actors_get(args: argparse.Namespace) -> int:
    """Print an actor's state, memory summary and reminders as JSON."""
    async def action(client: RuntimeClient) -> None:
        described = await client.get_actor(args.type, args.id)
        _print_json({key: described[key] for key in ("state", "memory", "reminders")})

    return _client_call(args, action)


def cmd_actors_delete(args: argparse.Namespace) -> int:
    """Delete an actor (state, memory, reminders)."""
    import grpc

    from packetflow.client import CallError

    async def action(client: RuntimeClient) -> None:
        if not await client.delete_actor(args.type, args.id):
            raise CallError(grpc.StatusCode.NOT_FOUND,
                            f"actor {args.type}/{args.id} does not exist")
        print(f"deleted {args.type}/{args.id}")

    return _client_call(args, action)


def _actor_commands(sub: Any) -> None:
    send = sub.add_parser("send", help="send a message to an actor")
    send.add_argument("type", help="actor type")
    send.add_argument("id", help="actor id")
    send.add_argument("--data", default="{}",
                      help="message as JSON, @FILE or - for stdin (default {})")
    send.add_argument("--message-id", help="idempotency key: a retry is applied at most once")
    send.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    send.add_argument("--wait", action="store_true",
                      help="wait (within --timeout) for a runtime that is still starting")
    _address_flag(send)
    send.set_defaults(func=cmd_send)

    actors = sub.add_parser("actors", help="list, inspect and delete actors")
    actor_sub = actors.add_subparsers(dest="actors_command", required=True, metavar="ACTION")
    listing = actor_sub.add_parser("list", help="the actors of a type")
    listing.add_argument("type")
    _address_flag(listing)
    listing.set_defaults(func=cmd_actors_list)
    for name, func, text in (("get", cmd_actors_get, "an actor's state, memory, reminders"),
                             ("delete", cmd_actors_delete, "delete an actor")):
        command = actor_sub.add_parser(name, help=text)
        command.add_argument("type")
        command.add_argument("id")
        _address_flag(command)
        command.set_defaults(func=func)


async def _engine_errors(capabilities: list[Capability]) -> list[ManifestError]:
    """What building the capabilities finds: implementations, compositions, remote tools."""
    from packetflow.engine import Engine

    engine = Engine(capabilities)
    try:
        return [*engine.load_errors, *await engine.verify_remotes()]
    finally:
        await engine.aclose()


def cmd_validate(args: argparse.Namespace) -> int:
    """Check manifests (and that python implementations import); every error, then exit 1."""
    from packetflow.actors.handlers import handler_errors
    from packetflow.manifests import load_paths
    from packetflow.serve import report

    for path in {p if p.is_dir() else p.parent for p in args.paths} | {Path.cwd()}:
        sys.path.insert(0, str(path))
    missing = [p for p in args.paths if not p.exists()]
    loaded = load_paths([p for p in args.paths if p.exists()])
    errors = [*loaded.errors, *asyncio.run(_engine_errors(loaded.capabilities)),
              *handler_errors(loaded.actors)]
    for path in missing:
        print(f"error: {path}: no such file or directory", file=sys.stderr)
    report(errors)
    if errors or missing:
        return 1
    print(f"ok: {len(loaded.capabilities)} capabilities and {len(loaded.actors)} actor types "
          "valid")
    return 0


def _mesh_from_runtime(args: argparse.Namespace) -> Mesh:
    """The mesh a running runtime (or gateway) describes, dependencies included."""
    from packetflow.client import RuntimeClient, tls_credentials
    from packetflow.graph import Dependency, Mesh, Node

    credentials = tls_credentials(args.cert, args.key, args.ca)

    async def ask() -> Mesh:
        mesh = Mesh()
        async with RuntimeClient(args.address, credentials=credentials) as client:
            for summary in await client.list():
                described = await client.describe(summary.name)
                mesh.add(Node(summary.name, summary.implementation, tuple(
                    Dependency.from_json(d) for d in described["dependencies"])))
            for kind in await client.list_actor_types():
                described = await client.describe_actor_type(kind.name)
                mesh.add(Node(kind.name, "actor", tuple(
                    Dependency.from_json(d) for d in described["dependencies"])))
        return mesh

    return asyncio.run(ask())


def _live_stats(url: str, window: float) -> dict[str, Stats]:
    """Per-capability rates from two scrapes of a runtime's ``/metrics``, ``window`` apart."""
    import time
    import urllib.request

    from packetflow.graph import parse_totals, stats_between

    def scrape() -> str:
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    before, started = parse_totals(scrape()), time.monotonic()
    time.sleep(window)  # the window the rates are measured over
    after = parse_totals(scrape())
    return stats_between(before, after, time.monotonic() - started)


def cmd_graph(args: argparse.Namespace) -> int:
    """Draw the mesh (capabilities, actor types, what they call) as DOT, Mermaid or SVG."""
    import shutil
    import subprocess

    from packetflow.graph import mesh_of, render_dot, render_mermaid

    if args.format == "svg" and shutil.which("dot") is None:
        print("error: --format svg needs Graphviz's dot (Debian package graphviz); "
              "use --format dot or mermaid", file=sys.stderr)
        return 2
    if args.paths:
        from packetflow.manifests import load_paths
        from packetflow.serve import report

        loaded = load_paths(args.paths)
        report(loaded.errors)
        mesh = mesh_of(loaded.capabilities, loaded.actors, loaded.federations)
    else:
        from packetflow.client import CallError, TlsFilesError

        try:
            mesh = _mesh_from_runtime(args)
        except (CallError, TlsFilesError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    try:
        stats = _live_stats(args.metrics_url, args.window) if args.metrics_url else None
    except (OSError, ValueError) as exc:
        print(f"error: --metrics-url {args.metrics_url}: {exc}", file=sys.stderr)
        return 1
    text = render_mermaid(mesh, stats) if args.format == "mermaid" else render_dot(mesh, stats)
    if args.format == "svg":
        text = subprocess.run(["dot", "-Tsvg"], input=text, capture_output=True, text=True,
                              check=True, timeout=60).stdout
    sys.stdout.write(text)
    return 0


def build_parser(plugins: bool = True) -> argparse.ArgumentParser:
    """The argument parser; with ``plugins``, also the subcommands contributed through the
    ``packetflow.commands`` entry points (they import more, so client commands skip them)."""
    parser = argparse.ArgumentParser(prog="packetflow", description=__doc__)
    parser.add_argument("--version", action="version", version=f"packetflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    dev = sub.add_parser("dev", help="serve every manifest in DIR locally")
    dev.add_argument("paths", nargs="+", type=Path, metavar="DIR")
    dev.add_argument("--no-reload", action="store_true", help="do not reload on file changes")
    dev.add_argument("--mtls", action="store_true",
                     help="zero trust: make a local authority and certificates under "
                          "STATE_DIR/tls and serve mutual TLS only (clients: --cert/--key/--ca)")
    _serve_flags(dev)
    dev.set_defaults(func=cmd_dev)

    runtime = sub.add_parser("runtime", help="serve a spec bundle (as a pod does)")
    runtime.add_argument("--bundle", type=Path, required=True, help="manifest file or directory")
    runtime.add_argument("--reload", action="store_true",
                         help="reload when the bundle changes (e.g. a mounted ConfigMap)")
    _serve_flags(runtime)
    runtime.set_defaults(func=cmd_runtime)

    call = sub.add_parser("call", help="call a capability")
    call.add_argument("name")
    call.add_argument("--data", default="{}",
                      help="input as JSON, @FILE or - for stdin (default {})")
    call.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    call.add_argument("--stream", action="store_true", help="show progress events")
    call.add_argument("--trace", action="store_true",
                      help="print a composition's execution trace (JSON) on stderr")
    call.add_argument("--wait", action="store_true",
                      help="wait (within --timeout) for a runtime that is still starting")
    _address_flag(call)
    call.set_defaults(func=cmd_call)

    listing = sub.add_parser("list", help="list served capabilities and actor types")
    listing.add_argument("--kind", choices=("capability", "actor"),
                         help="only capabilities or only actor types")
    _address_flag(listing)
    listing.set_defaults(func=cmd_list)

    describe = sub.add_parser("describe",
                              help="show a capability's or an actor type's contract")
    describe.add_argument("name")
    _address_flag(describe)
    describe.set_defaults(func=cmd_describe)

    _actor_commands(sub)

    graph = sub.add_parser("graph", help="draw capabilities, actor types and what they call")
    graph.add_argument("paths", nargs="*", type=Path, metavar="DIR",
                       help="manifests to draw; without: ask the runtime at --address")
    graph.add_argument("--format", choices=("dot", "mermaid", "svg"), default="dot",
                       help="DOT and Mermaid text always; SVG through Graphviz (default dot)")
    graph.add_argument("--metrics-url", metavar="URL",
                       help="a runtime's /metrics: colour nodes by call rate, errors, p99")
    graph.add_argument("--window", type=float, default=5.0,
                       help="seconds between the two scrapes of --metrics-url (default 5)")
    _address_flag(graph)
    graph.set_defaults(func=cmd_graph)

    validate = sub.add_parser("validate", help="check manifest files")
    validate.add_argument("paths", nargs="+", type=Path, metavar="FILE")
    validate.set_defaults(func=cmd_validate)

    for plugin in entry_points(group="packetflow.commands") if plugins else ():
        try:
            register = plugin.load()
        except ImportError:  # a partial install (e.g. no operator deps) keeps the rest usable
            continue
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``packetflow`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    args = build_parser(plugins=command not in CLIENT_COMMANDS).parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        code = 130
    return code


if __name__ == "__main__":
    sys.exit(main())
