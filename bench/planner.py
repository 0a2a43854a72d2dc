"""The planner's evaluation: ``python -m bench planner [--intents FILE] [--registry PATH]``.

Each intent of the evaluation set (``bench/planner_eval/intents.json``: 50 intents over the
examples plus the 45-capability toolbox in ``bench/planner_eval/``) is planned by the
built-in planner, checked again independently (the manifest parsed and put through the
composition checker), executed in a real engine when the plan may run, and judged against
its expectation:

- ``output``: an object (or a list of alternatives) the result must contain;
- ``unsatisfiable``: the planner must answer that no plan exists (NoPlan);
- ``blocked``: the plan uses effects the intent did not allow: it must be shown, not run.

Figures: ``valid_rate`` (plans passing the checker, and refusals: never an invalid plan),
``success_rate`` overall and per split (``dev``: the intents the planner was developed
against; ``holdout``: written with the rest before the planner and never tuned on),
``planning_p50_ms``/``planning_p99_ms`` (context only), then the same after a learning pass:
every execution is rated through the feedback store (1 when the output matched, else 0),
and the intents are planned again (preferences and the plan cache now apply).
``cache_ratio``: planning from the cache against planning afresh, the same intents, in
alternating rounds (median of the rounds' ratios of throughput).
Any file of the same format runs: ``{"intents": [{"id", "intent", "data", "expect",
"allowEffects"?, "split"?}]}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from bench.common import ROOT, percentile, ratio_figures, rounded

EVAL = ROOT / "bench" / "planner_eval"
ROUNDS = 7


def contains(actual: Any, expected: Any) -> bool:
    """Whether ``actual`` has everything ``expected`` has (objects by key, the rest equal)."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(
            key in actual and contains(actual[key], value) for key, value in expected.items())
    return bool(actual == expected)


def judged(expect: dict[str, Any], outcome: dict[str, Any]) -> bool:
    """Whether one intent's outcome meets its expectation."""
    if expect.get("unsatisfiable"):
        return outcome["kind"] == "no_plan"
    if expect.get("blocked"):
        return outcome["kind"] == "planned" and bool(outcome["blocked"]) \
            and not outcome["executed"]
    if outcome["kind"] != "planned" or outcome.get("error") or not outcome["executed"]:
        return False
    wanted = expect.get("output")
    alternatives = wanted if isinstance(wanted, list) else [wanted]
    return any(contains(outcome["results"], w) for w in alternatives)


def independently_valid(manifest: dict[str, Any], capabilities: Sequence[Any]) -> bool:
    """The plan's manifest parsed from its JSON and checked afresh, as a user applying it
    would."""
    from packetflow.composition.check import check_compositions
    from packetflow.manifests import parse_manifest
    from packetflow.spec import Capability

    parsed = parse_manifest(orjson.loads(orjson.dumps(manifest)), "plan")
    if not isinstance(parsed, Capability):
        return False
    return parsed.name not in check_compositions([parsed, *capabilities])


async def evaluate(intents: list[dict[str, Any]], registry: list[Path],
                   embeddings: bool) -> dict[str, Any]:
    """Plan, check, execute and judge every intent, learn, and do it again."""
    from packetflow.context import CallContext
    from packetflow.engine import Engine
    from packetflow.feedback import FeedbackService, SqliteFeedbackStore
    from packetflow.manifests import load_paths
    from packetflow.planner.core import NoPlan, Planner, PlanRequest
    from packetflow.planner.settings import PlannerSettings
    from packetflow.planner.store import sqlite_store

    loaded = load_paths(registry)
    if loaded.errors:
        raise SystemExit("\n".join(str(e) for e in loaded.errors))
    engine = Engine(loaded.capabilities)
    if engine.load_errors:
        raise SystemExit("\n".join(str(e) for e in engine.load_errors))
    with tempfile.TemporaryDirectory() as tmp:
        store = sqlite_store(Path(tmp) / "planner.db")
        feedback = FeedbackService(SqliteFeedbackStore(Path(tmp) / "feedback.db"),
                                   engine.metrics.registry, engine.traces)
        planner = Planner(engine.capabilities, engine.invoke, settings=PlannerSettings(
            embeddings=embeddings), store=store, feedback=feedback.store,
            registry=engine.metrics.registry, step_metrics=engine.step_metrics)
        if hasattr(planner.ranker, "warm"):
            await asyncio.to_thread(planner.ranker.warm)  # load the model before timing
        capabilities = engine.capabilities()

        async def one(entry: dict[str, Any], use_cache: bool) -> dict[str, Any]:
            request = PlanRequest(entry["intent"], entry.get("data", {}),
                                  allow_effects=bool(entry.get("allowEffects")),
                                  planner="builtin", use_cache=use_cache)
            started = time.perf_counter()
            try:
                result = await planner.plan(request)
            except NoPlan as exc:
                return {"kind": "no_plan", "ms": (time.perf_counter() - started) * 1000,
                        "valid": True, "message": exc.message}
            elapsed = (time.perf_counter() - started) * 1000
            valid = independently_valid(result.plan.manifest, capabilities)
            ctx = CallContext(capability=result.plan.name, trace_id=f"eval-{time.time_ns()}")
            await planner.execute(result, request.data, ctx)
            return {"kind": "planned", "ms": elapsed, "valid": valid,
                    "planner": result.plan.planner, "calls": result.plan.calls,
                    "blocked": result.blocked, "executed": result.executed,
                    "results": result.results, "trace_id": result.trace_id,
                    "error": result.error.message if result.error else None}

        async def run_pass(learn: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
            outcomes = []
            for entry in intents:
                outcome = await one(entry, use_cache=True)
                outcome["ok"] = judged(entry.get("expect", {}), outcome)
                outcomes.append(outcome)
                if learn and outcome.get("executed"):
                    await feedback.record(outcome["trace_id"], 1.0 if outcome["ok"] else 0.0)
            return figures(intents, outcomes), outcomes

        try:
            before, first = await run_pass(learn=True)
            after, second = await run_pass(learn=False)
            cache = ratio_figures("cache_ratio", await cache_rounds(planner, intents))
        finally:
            await store.aclose()
            await feedback.aclose()
            await engine.aclose()
    retrieval = "bm25" if planner.ranker.name == "bm25" else "bm25+embeddings"
    report: dict[str, Any] = {"intents": len(intents), "capabilities": len(capabilities),
                              "retrieval": retrieval, **before,
                              **{f"after_learning_{k}": v for k, v in after.items()
                                 if k.endswith("rate") or k.startswith("success")},
                              **cache}
    report["failures"] = [{"id": e["id"], "split": e.get("split", "dev"),
                           "calls": o.get("calls"), "message": o.get("message")
                           or o.get("error"), "results": o.get("results")}
                          for e, o in zip(intents, first, strict=True) if not o["ok"]]
    report["changed_by_learning"] = [e["id"] for e, a, b in zip(intents, first, second,
                                                                strict=True)
                                     if a["ok"] != b["ok"]]
    return report


async def cache_rounds(planner: Any, intents: list[dict[str, Any]]) -> list[float]:
    """Throughput of planning from the cache over planning afresh, the same intents,
    alternating rounds (plans only: nothing runs)."""
    from packetflow.planner.core import NoPlan, PlanRequest

    async def plan_all(use_cache: bool) -> float:
        started = time.perf_counter()
        for entry in intents:
            request = PlanRequest(entry["intent"], entry.get("data", {}),
                                  allow_effects=bool(entry.get("allowEffects")),
                                  planner="builtin", use_cache=use_cache)
            with contextlib.suppress(NoPlan):
                await planner.plan(request)
        return len(intents) / (time.perf_counter() - started)

    ratios = []
    for _ in range(ROUNDS):
        fresh = await plan_all(False)
        ratios.append(await plan_all(True) / fresh)
    return ratios


def figures(intents: list[dict[str, Any]], outcomes: list[dict[str, Any]]) -> dict[str, Any]:
    """Rates and planning times of one pass."""
    out: dict[str, Any] = {
        "valid_rate": rounded(sum(o["valid"] for o in outcomes) / len(outcomes)),
        "success_rate": rounded(sum(o["ok"] for o in outcomes) / len(outcomes)),
        "planning_p50_ms": rounded(percentile([o["ms"] for o in outcomes], 0.5)),
        "planning_p99_ms": rounded(percentile([o["ms"] for o in outcomes], 0.99)),
    }
    for split in sorted({e.get("split", "dev") for e in intents}):
        chosen = [o for e, o in zip(intents, outcomes, strict=True)
                  if e.get("split", "dev") == split]
        out[f"success_rate_{split}"] = rounded(sum(o["ok"] for o in chosen) / len(chosen))
        out[f"intents_{split}"] = len(chosen)
    return out


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of ``python -m bench planner``."""
    parser = argparse.ArgumentParser(prog="python -m bench planner")
    parser.add_argument("--intents", type=Path, default=EVAL / "intents.json")
    parser.add_argument("--registry", type=Path, action="append",
                        help="manifest file or directory (repeatable); default: examples/ "
                             "and bench/planner_eval/toolbox.yaml")
    parser.add_argument("--no-embeddings", action="store_true",
                        help="BM25 only, even with the embeddings extra installed")
    args = parser.parse_args(list(argv or []))
    registry = args.registry or [ROOT / "examples", EVAL / "toolbox.yaml"]
    for path in [ROOT, *registry]:
        sys.path.insert(0, str(path if path.is_dir() else path.parent))
    intents = orjson.loads(args.intents.read_bytes())["intents"]
    return asyncio.run(evaluate(intents, registry, not args.no_embeddings))
