"""``packetflow mcp --stdio DIR``: serve manifests as an MCP server over stdin/stdout.

For local clients (desktop assistants) that start a server as a subprocess. stdout carries
only MCP messages; logs and manifest errors go to stderr. Actor types are served too, their
state under ``--state-dir`` (as with ``packetflow dev``), so a restarted server finds it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from mcp.server.stdio import stdio_server

from packetflow.actors.service import attach
from packetflow.logs import configure_logging
from packetflow.mcp.planner import planner_source
from packetflow.mcp.server import McpService
from packetflow.serve import exit_now, feedback_and_planner, load_runtime, report
from packetflow.settings import RuntimeSettings


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add the ``mcp`` subcommand (entry point group ``packetflow.commands``)."""
    parser = sub.add_parser("mcp", help="serve manifests as an MCP server over stdio")
    parser.add_argument("paths", nargs="+", type=Path, metavar="DIR")
    parser.add_argument("--stdio", action="store_true", required=True,
                        help="speak MCP on stdin/stdout (logs go to stderr)")
    parser.add_argument("--state-dir", type=Path,
                        help="durable local state: actors, trigger keys (default .packetflow)")
    parser.add_argument("--log-level", default="WARNING", help="stderr log level")
    parser.set_defaults(func=cmd_mcp)


def cmd_mcp(args: argparse.Namespace) -> int:
    """Serve every manifest under the paths over stdio until stdin closes."""
    configure_logging(args.log_level, "text")
    # Python implementations import from the current directory and the manifest dirs,
    # as with `packetflow dev`.
    for path in [Path.cwd(), *args.paths]:
        sys.path.insert(0, str(path if path.is_dir() else path.parent))
    # PACKETFLOW_STATE_DIR applies as for the other serving commands; the flag wins.
    settings = RuntimeSettings(**({"state_dir": args.state_dir} if args.state_dir else {}))
    exit_now(asyncio.run(serve_stdio(args.paths, settings)))


async def serve_stdio(paths: list[Path], settings: RuntimeSettings | None = None) -> int:
    """Load the manifests and answer MCP on stdin/stdout; manifest errors go to stderr."""
    settings = settings or RuntimeSettings()
    # No gRPC port here for other members to forward to: an actor type with replicas is
    # served by forwarding every message to its members (placement's observer).
    engine, actors, errors = await load_runtime(paths, settings, observer=True)
    forwarder = attach(actors)
    report(errors)
    engine.start_triggers()
    feedback, planning, planner = await feedback_and_planner(engine, settings)
    service = McpService.for_runtime(engine, actors)
    for source in planner_source(planner, feedback, engine.traces):
        service.add_source(source)
    names = ", ".join(sorted([*engine.served, *actors.types])) or "nothing"
    print(f"packetflow: MCP over stdio serving {names}", file=sys.stderr, flush=True)
    try:
        async with stdio_server() as (read_stream, write_stream):
            await service.server.run(read_stream, write_stream,
                                     service.server.create_initialization_options())
    finally:
        await actors.aclose()
        await forwarder.close()
        await engine.aclose()
        await planner.aclose()
        await planning.aclose()
        await feedback.aclose()
    return 0
