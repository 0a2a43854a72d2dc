"""``packetflow plan INTENT``: ask a runtime for a plan, see why, and run it.

A client command: it imports only the gRPC client (and YAML), like ``call``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson
import yaml

from packetflow.cli import DataError, _address_flag, read_data

EXIT_BLOCKED = 3


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``plan`` (entry point group ``packetflow.commands``)."""
    parser = sub.add_parser(
        "plan", help="turn a sentence of intent into a checked composition (and run it)",
        description="Plan an intent over the capabilities a runtime serves. Prints the plan "
                    "as a Capability manifest (save it and kubectl apply it); with --execute "
                    "runs it and prints the results.")
    parser.add_argument("intent", help="what you want done, in a sentence")
    parser.add_argument("--data", default="{}",
                        help="the input as JSON, @FILE or - for stdin (default {})")
    parser.add_argument("--execute", action="store_true", help="run the plan too")
    parser.add_argument("--explain", action="store_true",
                        help="say why each capability was chosen and the scores that decided")
    parser.add_argument("--allow-effects", action="store_true",
                        help="let a plan with effects (network, email...) run")
    parser.add_argument("--capability", action="append", default=[], metavar="NAME",
                        help="only these capabilities may be used (repeatable)")
    parser.add_argument("--planner", choices=("auto", "builtin", "model"), default="auto",
                        help="auto: the runtime's model if it has one, else built in")
    parser.add_argument("--no-cache", action="store_true", help="do not reuse a cached plan")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object: plan, explanation, results, trace")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds (default 60)")
    _address_flag(parser)  # --address, and --cert/--key/--ca for a zero-trust runtime
    parser.set_defaults(func=cmd_plan)


def explanation_lines(result: dict[str, Any]) -> list[str]:
    """The explanation as comment lines (they keep the manifest appliable)."""
    why = result.get("explanation", {})
    lines = [f"planner: {result.get('planner')}"
             + (f" ({why['retrieval']} retrieval)" if why.get("retrieval") else "")]
    for step in why.get("steps", []):
        pref = step.get("preference", {})
        head = f"{step['capability']}"
        if "why" in step:
            head += f" ({step.get('role', 'goal')}): {step['why']}"
        if "relevance" in step:
            head += f"; relevance {step['relevance']}, preference {pref.get('score', 0.5)}" \
                    f" from {pref.get('evidence', 0)} runs"
        lines.append(head)
        for binding in step.get("inputs", []):
            lines.append(f"  {binding['field']} <- {binding['from']} ({binding['reason']})")
    if "score" in why:
        lines.append("score: " + ", ".join(f"{k} {v}" for k, v in why["score"].items()))
    for alternative in why.get("alternatives", []):
        lines.append(f"not chosen: {' -> '.join(alternative['steps'])} ({alternative['form']}, "
                     f"score {alternative['score']})")
    if why.get("uncovered"):
        lines.append("not covered by any step: " + ", ".join(why["uncovered"]))
    for attempt in why.get("model", {}).get("attempts", why.get("attempts", [])):
        lines.append(f"model attempt: {attempt['outcome']} " + "; ".join(attempt["problems"]))
    if result.get("blocked"):
        lines.append(f"not run: {result['blocked']}")
    return [f"# {line}" for line in lines]


def cmd_plan(args: argparse.Namespace) -> int:
    """Plan (and with --execute run) an intent at a runtime; print plan, reasons, results."""
    from packetflow.cli import _client_call
    from packetflow.client import ProgressEvent, RuntimeClient

    try:
        value = read_data(args.data)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    outcome = {"code": 0}

    def progress(event: ProgressEvent) -> None:
        print(f"progress: {event.message}", file=sys.stderr)

    async def action(client: RuntimeClient) -> None:
        options: dict[str, Any] = {
            "allow_effects": args.allow_effects, "capabilities": args.capability,
            "planner": args.planner, "use_cache": not args.no_cache, "timeout": args.timeout}
        if args.execute:
            result = await client.plan_and_execute(args.intent, value, on_progress=progress,
                                                   **options)
        else:
            result = await client.plan(args.intent, value, **options)
        if args.json:
            sys.stdout.write(orjson.dumps(result).decode() + "\n")
        else:
            show(result, args.explain, args.execute)
        if result.get("error"):
            outcome["code"] = 1
        elif args.execute and result.get("blocked"):
            outcome["code"] = EXIT_BLOCKED

    return _client_call(args, action) or outcome["code"]


def show(result: dict[str, Any], explain: bool, executed: bool) -> None:
    """Print for a person: the manifest (stdout, or stderr when results take stdout)."""
    text = "\n".join([*(explanation_lines(result) if explain else []),
                      yaml.safe_dump(result["plan"], sort_keys=False, allow_unicode=True)])
    if not executed:
        sys.stdout.write(text)
        if result.get("blocked") and not explain:
            print(f"# not run if executed: {result['blocked']}", file=sys.stderr)
        return
    print(text, file=sys.stderr)
    if result.get("blocked"):
        print(f"not run: {result['blocked']}", file=sys.stderr)
        return
    if result.get("trace") is not None:
        print(orjson.dumps(result["trace"], option=orjson.OPT_INDENT_2).decode(),
              file=sys.stderr)
    if result.get("error"):
        error = result["error"]
        print(f"error: {error['code']}: {error['message']}", file=sys.stderr)
    else:
        sys.stdout.write(orjson.dumps(result.get("results")).decode() + "\n")
    print(f"trace id: {result.get('traceId')} (rate it: packetflow feedback "
          f"{result.get('traceId')} --score 0..1)", file=sys.stderr)
