"""The planner: intent -> checked plan -> execution with a trace -> what it learns.

Transport-neutral (gRPC ``Plan``/``PlanAndExecute``, the MCP tools, the ``planner``
implementation kind and the bench all call this): it reads the capabilities through a
``catalog`` callable and runs plans through the composition executor with the engine's
``invoke``, so a plan runs exactly as a deployed composition would (deadline, retries,
cancellation, trace, step metrics).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from prometheus_client import CollectorRegistry

from packetflow.actors.search import Bm25Ranker, extra_missing, rank, ranker_for
from packetflow.composition.executor import (
    Invoke,
    Remote,
    composition_handler,
    trace_of,
)
from packetflow.composition.metrics import StepMetrics
from packetflow.context import CallContext
from packetflow.contracts import CompiledContract
from packetflow.errors import (
    Code,
    ContractViolation,
    DeadlineExceeded,
    FieldViolation,
    InvalidInput,
    NotServable,
    PacketFlowError,
    code_of,
)
from packetflow.feedback import FeedbackStore
from packetflow.planner.catalog import CapabilityInfo, catalog_of
from packetflow.planner.compose import (
    CheckedPlan,
    PlanRejected,
    checked_plan,
    composition_of,
    effects_gate,
    manifest_for,
    provides_data,
    provides_of,
)
from packetflow.planner.learning import (
    CacheEntry,
    Outcome,
    Preference,
    best_cached,
    cache_key,
    preferences,
    signature,
)
from packetflow.planner.llm import ChatModel, ModelAttempt, plan_with_model
from packetflow.planner.metrics import PlannerMetrics
from packetflow.planner.retrieval import fused_relevance, lexical_relevance, semantic_texts
from packetflow.planner.search import (
    JSON_TYPES,
    CandidatePlan,
    Context,
    SearchResult,
    acceptable,
    input_fields,
    search,
    term_weights,
)
from packetflow.planner.settings import PlannerSettings
from packetflow.planner.store import PlannerStore
from packetflow.planner.text import IntentAnalysis, analyse, terms
from packetflow.spec import Capability

log = logging.getLogger("packetflow.planner")

PLANNERS = ("auto", "builtin", "model")
MAX_CACHED_TRACES = 20
CHECKED_CANDIDATES = 5  # built-in candidates tried against the checker, best first


class NoPlan(NotServable):
    """No well-typed plan satisfies the intent; the message names what is missing."""


@dataclass(frozen=True)
class PlanRequest:
    """What a caller asks for."""

    intent: str
    data: Any = field(default_factory=dict)
    allow_effects: bool = False
    capabilities: Sequence[str] = ()  # further restricts what the plan may call
    planner: str = "auto"  # auto (model if configured, else built-in) | builtin | model
    use_cache: bool = True


@dataclass
class PlanResult:
    """A checked plan, why it is what it is, and (after execution) how it went."""

    plan: CheckedPlan
    explanation: dict[str, Any]
    blocked: str = ""  # why it was not (or may not be) run
    executed: bool = False
    results: dict[str, Any] | None = None
    trace: dict[str, Any] | None = None
    trace_id: str = ""
    error: PacketFlowError | None = None
    terms: tuple[str, ...] = ()
    cache_key: str = ""
    cache_signature: str = ""
    cached: CacheEntry | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain data: what the wire and the CLI show."""
        out: dict[str, Any] = {"plan": self.plan.manifest, "planner": self.plan.planner,
                               "explanation": self.explanation, "executed": self.executed}
        if self.blocked:
            out["blocked"] = self.blocked
        if self.executed:
            out["traceId"] = self.trace_id
            out["results"] = self.results
            out["trace"] = self.trace
        if self.error is not None:
            out["error"] = {"code": code_of(self.error).value, "message": self.error.message}
        return out


class Planner:
    """Plans intents over a catalog of capabilities and runs the plans."""

    def __init__(self, catalog: Callable[[], Iterable[Capability]], invoke: Invoke,
                 remote: Remote | None = None, *, settings: PlannerSettings | None = None,
                 store: PlannerStore | None = None, feedback: FeedbackStore | None = None,
                 model: ChatModel | None = None, registry: CollectorRegistry | None = None,
                 step_metrics: StepMetrics | None = None, allowed: Sequence[str] = (),
                 exclude: Sequence[str] = (),
                 clock: Callable[[], float] = time.time) -> None:
        self.catalog = catalog
        self.invoke = invoke
        self.remote = remote
        self.settings = settings or PlannerSettings()
        self.store = store
        self.feedback = feedback
        self.model = model
        self.metrics = PlannerMetrics.of(registry)
        self.step_metrics = step_metrics
        self.allowed = tuple(allowed)
        self.exclude = tuple(exclude)
        self.clock = clock
        self._infos: dict[str, tuple[Capability, CapabilityInfo]] = {}
        # Embeddings only when wanted and installed; without the extra, BM25 (no warning:
        # the planner is good without them).
        self.ranker = ranker_for(True) if self.settings.embeddings and not extra_missing() \
            else Bm25Ranker()

    # ------------------------------------------------------------------------- planning

    def check_request(self, request: PlanRequest) -> None:
        """Bad requests get InvalidInput naming the field."""
        problems = []
        if not isinstance(request.intent, str) or not request.intent.strip():
            problems.append(FieldViolation("intent", "must not be empty"))
        elif len(request.intent) > self.settings.max_intent_chars:
            problems.append(FieldViolation(
                "intent", f"at most {self.settings.max_intent_chars} characters, got "
                          f"{len(request.intent)}"))
        if not isinstance(request.data, dict):
            problems.append(FieldViolation("input", "must be a JSON object"))
        if request.planner not in PLANNERS:
            problems.append(FieldViolation("planner", f"must be one of {', '.join(PLANNERS)}"))
        if request.planner == "model" and self.model is None:
            problems.append(FieldViolation("planner", "no language model is configured "
                                                      "(PACKETFLOW_PLANNER_PROVIDER)"))
        if problems:
            raise InvalidInput(problems)

    def usable(self, request: PlanRequest) -> list[CapabilityInfo]:
        """The capabilities this request's plan may call."""
        everything = list(self.catalog())
        names = {cap.name for cap in everything}
        unknown = [n for n in request.capabilities if n not in names]
        if unknown:
            raise InvalidInput([FieldViolation("capabilities", f"no capability {unknown[0]!r}")])
        allowed = set(self.allowed)
        if request.capabilities:
            allowed = set(request.capabilities) & allowed if allowed else set(
                request.capabilities)
        return catalog_of(everything, allowed, self.exclude, self._info)

    def _info(self, capability: Capability) -> CapabilityInfo:
        """A capability's description, remembered while the engine serves the same object
        (a reload makes new ones)."""
        known = self._infos.get(capability.name)
        if known is None or known[0] is not capability:
            known = self._infos[capability.name] = (capability, CapabilityInfo.of(capability))
        return known[1]

    async def plan(self, request: PlanRequest) -> PlanResult:
        """A checked plan for the request (NoPlan naming what is missing when there is none).

        The effects gate is applied: ``blocked`` says why a plan may not run.
        """
        started = time.perf_counter()
        self.check_request(request)
        catalog = self.usable(request)
        if not catalog:
            raise NoPlan("no capabilities with declared contracts to plan with")
        allowed = {info.name: info.capability for info in catalog}
        analysis = analyse(request.intent)
        fields = {name: JSON_TYPES.get(type(v), "object") for name, v in request.data.items()}
        sig = signature(fields, allowed, f"steps={self.settings.max_steps}")
        constants = orjson.dumps(sorted(str(c.value) for c in analysis.constants)).decode()
        key = cache_key(sig, analysis.terms, constants)
        outcome = "ok"
        planner = "builtin"
        try:
            result = None
            if request.use_cache and self.store is not None:
                result = await self._from_cache(request, analysis, sig, constants, allowed)
            if result is None:
                prefs = await self._preferences(analysis, catalog)
                result = await self._fresh(request, analysis, catalog, allowed, fields, prefs)
            planner = result.plan.planner
            result.terms, result.cache_key, result.cache_signature = analysis.terms, key, sig
            result.blocked = effects_gate(result.plan, request.allow_effects)
            result.explanation["effects"] = result.plan.effects
            if result.blocked:
                result.explanation["blocked"] = result.blocked
            return result
        except NoPlan:
            outcome = "no_plan"
            raise
        finally:
            self.metrics.plans.labels(planner, outcome).inc()
            self.metrics.planning.observe(time.perf_counter() - started)

    async def _preferences(self, analysis: IntentAnalysis,
                           catalog: Sequence[CapabilityInfo]) -> dict[str, Preference]:
        if self.store is None:
            return {}
        outcomes = await self.store.outcomes([info.name for info in catalog])
        rated = await self.feedback.scores([o.trace_id for o in outcomes]) \
            if self.feedback is not None and outcomes else {}
        return preferences(analysis.terms, outcomes, rated)

    async def _from_cache(self, request: PlanRequest, analysis: IntentAnalysis, sig: str,
                          constants: str, allowed: Mapping[str, Capability]
                          ) -> PlanResult | None:
        assert self.store is not None
        entries = await self.store.cached(sig)
        if not entries:
            return None
        rated = await self.feedback.scores(
            [t for e in entries for t in e.traces]) if self.feedback is not None else {}
        entry, condemned = best_cached(entries, analysis.terms, constants, rated)
        for bad in condemned:
            log.info("cached plan dropped: its runs were rated badly", extra={"key": bad.key})
            await self.store.cache_drop(bad.key)
        if entry is None:
            return None
        try:
            manifest = orjson.loads(entry.manifest)
            manifest["spec"]["intent"] = request.intent
            plan = checked_plan(manifest, allowed, "cache")
        except (PlanRejected, orjson.JSONDecodeError, KeyError, TypeError) as exc:
            log.info("cached plan dropped: no longer valid (%s)", exc)
            await self.store.cache_drop(entry.key)
            return None
        return PlanResult(plan, {"planner": "cache", "cachedAt": entry.at,
                                 "runs": len(entry.traces),
                                 "steps": [{"capability": name} for name in plan.calls]},
                          cached=entry)

    async def _fresh(self, request: PlanRequest, analysis: IntentAnalysis,
                     catalog: Sequence[CapabilityInfo], allowed: Mapping[str, Capability],
                     fields: Mapping[str, str], prefs: Mapping[str, Preference]) -> PlanResult:
        relevance = await self._relevance(analysis, catalog)
        model_attempts: list[ModelAttempt] = []
        if self.model is not None and request.planner != "builtin":
            plan, model_attempts = await self._model_plan(request, catalog, allowed, fields,
                                                          relevance)
            if plan is not None:
                plan.explanation = {"planner": "model", "provider": self.model.provider,
                                    "model": self.model.model,
                                    "attempts": [a.__dict__ for a in model_attempts],
                                    "steps": [{"capability": n} for n in plan.calls]}
                return PlanResult(plan, plan.explanation)
            if request.planner == "model":
                raise NoPlan("the language model gave no valid plan: " + "; ".join(
                    p for a in model_attempts for p in a.problems)[:2000])
        ctx = Context(analysis, catalog, relevance,
                      {name: p.score for name, p in prefs.items()},
                      term_weights(analysis, catalog), self.settings.max_steps)
        found = search(ctx, input_fields(request.data))
        plan, chosen = self._first_valid(request, found, allowed)
        explanation = explain(chosen, found, ctx, prefs, "bm25" if isinstance(
            self.ranker, Bm25Ranker) else "bm25+embeddings")
        if model_attempts:
            explanation["model"] = {"provider": self.model.provider if self.model else "",
                                    "attempts": [a.__dict__ for a in model_attempts],
                                    "fallback": "the built-in planner"}
        plan.explanation = explanation
        return PlanResult(plan, explanation)

    async def _relevance(self, analysis: IntentAnalysis,
                         catalog: Sequence[CapabilityInfo]) -> dict[str, float]:
        lexical = lexical_relevance(analysis, catalog)
        semantic = None
        if not isinstance(self.ranker, Bm25Ranker):
            semantic = await rank(self.ranker, analysis.text, semantic_texts(catalog),
                                  len(catalog))
        fused = fused_relevance(lexical, semantic)
        return {info.name: score for info, score in zip(catalog, fused, strict=True)}

    async def _model_plan(self, request: PlanRequest, catalog: Sequence[CapabilityInfo],
                          allowed: Mapping[str, Capability], fields: Mapping[str, str],
                          relevance: Mapping[str, float]
                          ) -> tuple[CheckedPlan | None, list[ModelAttempt]]:
        assert self.model is not None
        shown = sorted(catalog, key=lambda c: (-relevance.get(c.name, 0.0), c.name))
        shown = shown[: self.settings.prompt_capabilities]

        async def check(composition: dict[str, Any]) -> CheckedPlan:
            last = (composition.get("steps") or [{}])[-1]
            target = allowed.get(str((last.get("call") or {}).get("capability", ""))) \
                if isinstance(last, dict) and isinstance(last.get("call"), dict) else None
            provides = None
            if target is not None and "output" not in composition:
                provides = provides_data(target)
            return self._checked(request, composition, provides, allowed, "model")

        return await plan_with_model(self.model, [c.capability for c in shown], request.intent,
                                     fields, check, self.settings.max_repairs)

    def _checked(self, request: PlanRequest, composition: Mapping[str, Any],
                 provides: Mapping[str, Any] | None, allowed: Mapping[str, Capability],
                 planner: str) -> CheckedPlan:
        manifest = manifest_for(request.intent, request.data, composition, provides, (),
                                planner)
        plan = checked_plan(manifest, allowed, planner)
        if plan.effects:  # declare them, as a deployed composition must
            manifest = manifest_for(request.intent, request.data, composition, provides,
                                    [e for effects in plan.effects.values() for e in effects],
                                    planner)
            plan = checked_plan(manifest, allowed, planner)
        return plan

    def _first_valid(self, request: PlanRequest, found: SearchResult,
                     allowed: Mapping[str, Capability]) -> tuple[CheckedPlan, CandidatePlan]:
        rejected: list[str] = []
        for candidate in [p for p in found.plans if acceptable(p)][:CHECKED_CANDIDATES]:
            try:
                return self._checked(request, composition_of(candidate), provides_of(candidate),
                                     allowed, "builtin"), candidate
            except PlanRejected as exc:  # the search's own typing missed something: next
                log.warning("built-in plan rejected by the checker: %s", exc)
                rejected.append(str(exc))
        raise NoPlan(no_plan_message(request.intent, found, rejected))

    # ------------------------------------------------------------------------ execution

    async def execute(self, result: PlanResult, data: dict[str, Any],
                      ctx: CallContext) -> PlanResult:
        """Run a checked plan (unless the effects gate holds it); learn from the outcome.

        The plan's own failure is reported in ``result.error`` with its trace, not raised.
        """
        if result.blocked:
            return result
        plan = result.plan
        progress = ctx.progress
        total = len(plan.calls)
        done: list[str] = []

        async def invoke(name: str, value: Any, child: CallContext) -> dict[str, Any]:
            progress(f"{name}: started", len(done) / total if total else -1.0)
            output = await self.invoke(name, value, child)
            done.append(name)
            progress(f"{name}: done", min(1.0, len(done) / total) if total else -1.0)
            return output

        handler = composition_handler(plan.composition, invoke, self.remote, name=plan.name,
                                      metrics=self.step_metrics)
        requires = CompiledContract.compile(plan.capability.spec.requires)
        provides = CompiledContract.compile(plan.capability.spec.provides)
        loop = asyncio.get_running_loop()
        if ctx.deadline is None:
            ctx.deadline = loop.time() + self.settings.execution_timeout_seconds
        started = time.perf_counter()
        code = Code.INTERNAL
        try:
            value, violations = requires.check(data, "input")
            if violations:
                raise InvalidInput(violations)
            try:
                async with asyncio.timeout_at(ctx.deadline):
                    output = await handler(value, ctx)
            except TimeoutError:
                raise DeadlineExceeded(f"plan {plan.name!r} did not finish before the "
                                       "deadline") from None
            output, violations = provides.check(output, "output")
            if violations:
                raise ContractViolation(plan.name, violations)
            result.results = output
            code = Code.OK
        except PacketFlowError as exc:
            result.error = exc
            code = code_of(exc)
        except asyncio.CancelledError:
            code = Code.CANCELLED  # the caller went away: nothing to learn from
            raise
        finally:
            result.executed = True
            result.trace_id = ctx.trace_id
            result.trace = trace_of(ctx)
            self.metrics.executions.labels(code.value).inc()
        await self.learn(result, ok=code == Code.OK,
                         latency_ms=(time.perf_counter() - started) * 1000)
        return result

    async def plan_and_execute(self, request: PlanRequest, ctx: CallContext) -> PlanResult:
        """Plan, then run the plan when the effects gate allows."""
        result = await self.plan(request)
        return await self.execute(result, request.data, ctx)

    async def learn(self, result: PlanResult, *, ok: bool, latency_ms: float) -> None:
        """Record the outcome; keep a successful plan in the cache, drop a failing cached
        one."""
        if self.store is None:
            return
        failed = "" if ok else _failed_capability(result.trace)
        await self.store.record(Outcome(result.trace_id, result.terms,
                                        tuple(result.plan.calls), ok, failed, latency_ms,
                                        self.clock()))
        cached = result.cached
        if not ok:
            if cached is not None:
                log.info("cached plan dropped: it failed", extra={"key": cached.key})
                await self.store.cache_drop(cached.key)
            return
        traces = ((*cached.traces, result.trace_id) if cached else (result.trace_id,))
        await self.store.cache_put(CacheEntry(
            cached.key if cached else result.cache_key,
            cached.signature if cached else result.cache_signature,
            cached.terms if cached else result.terms,
            cached.constants if cached else _constants_of(result),
            orjson.dumps(result.plan.manifest).decode(), traces[-MAX_CACHED_TRACES:],
            self.clock()))

    async def aclose(self) -> None:
        """Release the model's connections (the stores belong to whoever opened them)."""
        if self.model is not None:
            await self.model.aclose()


def _constants_of(result: PlanResult) -> str:
    intent = str(result.plan.manifest["spec"]["intent"])
    return orjson.dumps(sorted(str(c.value) for c in analyse(intent).constants)).decode()


def _failed_capability(trace: dict[str, Any] | None) -> str:
    """The capability of the first failed call step in a trace ("" when none is)."""
    for step in (trace or {}).get("steps", []):
        if step.get("outcome") != Code.OK.value and step.get("capability"):
            return str(step["capability"])
    return ""


# ----------------------------------------------------------------------------- explaining


def _word(term: str, analysis: IntentAnalysis) -> str:
    """The intent's own word for a term (as the user wrote it)."""
    return next((w for w in analysis.words if terms(w) == [term]), term)


def explain(chosen: CandidatePlan, found: SearchResult, ctx: Context,
            prefs: Mapping[str, Preference], retrieval: str) -> dict[str, Any]:
    """Why this plan: each step's words, bindings, relevance and preference; the scores that
    decided against the runners-up; what the intent said that nothing covers."""
    def pref(name: str) -> dict[str, float]:
        known = prefs.get(name)
        return {"score": known.score, "evidence": known.evidence} if known else \
            {"score": 0.5, "evidence": 0.0}

    steps = [{
        "capability": step.capability.name, "role": step.role,
        "why": ("covers " + ", ".join(repr(_word(t, ctx.analysis)) for t in sorted(step.covers))
                if step.covers else "feeds the next step"),
        "intent": step.capability.intent,
        "relevance": round(ctx.relevance.get(step.capability.name, 0.0), 4),
        "preference": pref(step.capability.name),
        "inputs": [{"field": b.field, "from": b.source.describe, "reason": b.reason}
                   for b in step.bindings],
    } for step in chosen.steps]
    others = [p for p in found.plans if p is not chosen][:3]
    return {
        "planner": "builtin", "retrieval": retrieval, "form": chosen.form, "steps": steps,
        "score": {"total": chosen.score, **chosen.parts},
        "alternatives": [{"steps": [s.capability.name for s in p.steps], "form": p.form,
                          "score": p.score} for p in others],
        "uncovered": [_word(t, ctx.analysis) for t in dict.fromkeys(ctx.analysis.terms)
                      if t not in chosen.covered],
    }


def no_plan_message(intent: str, found: SearchResult, rejected: Sequence[str]) -> str:
    """What is missing, in words: unmatched intent words, fields nothing could feed."""
    analysis = analyse(intent)
    reasons = []
    if found.uncovered:
        words = ", ".join(repr(_word(t, analysis)) for t in found.uncovered)
        reasons.append(f"no capability covers {words}")
    if found.plans and not any(acceptable(p) for p in found.plans):
        best = found.plans[0]
        reasons.append(f"the closest plan ({', '.join(s.capability.name for s in best.steps)})"
                       f" covers only {best.parts['coverage']:.0%} of the intent")
    lacking: dict[tuple[str, str], str] = {}
    for unwired in found.unwired:
        if unwired.field != "<chain>":
            lacking.setdefault((unwired.capability, unwired.field), unwired.detail)
    for (capability, name), detail in list(lacking.items())[:3]:
        reasons.append(f"{capability} needs {name}: {detail}")
    reasons.extend(rejected[:2])
    if not reasons:
        reasons.append("no capability matches the intent")
    return "no plan for this intent: " + "; ".join(reasons)
