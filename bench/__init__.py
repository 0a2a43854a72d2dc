"""PacketFlow benchmarks: ``python -m bench NAME [NAME...]`` prints one JSON line per bench.

Every speed figure is a ratio against a baseline doing the same work, measured in the same
run (see DESIGN.md, "Performance method"); absolute times are printed only for context.
"""

from __future__ import annotations

# name -> module exposing ``run() -> dict[str, Any]``. Adding a bench is one line here.
# Modules are imported only when their bench is asked for, so a bench whose dependencies are
# not built yet does not break the others.
BENCHES: dict[str, str] = {
    "runtime": "bench.runtime",
    "payload": "bench.payload",
    "operator": "bench.operator",
    "actors": "bench.actors",
    "compositions": "bench.compositions",
    "mcp": "bench.mcp",
    "cli": "bench.cli",
    "routing": "bench.routing",
    "federation": "bench.federation",
    "gateway": "bench.gateway",
    "planner": "bench.planner",
    "soak": "bench.soak",
}
