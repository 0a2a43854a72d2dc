"""The built-in planner's type-directed search over contracts.

Pure: an analysed intent, the fields the user supplied (names and JSON types, never their
values), the catalog, relevance and preference scores in; ranked candidate plans out.

A plan is a few *goal* capabilities, each covering words of the intent, wired together:
every required field of a step is bound to a source of a compatible type — a field of the
user's input, an output of an earlier step, or a value the intent names (a number near the
field's words, an enum value or the word its description gives for it, a quoted string, an
address) — chosen by name, then by the words of names and descriptions. A step that cannot
be fed gets a *bridge* (one capability that produces what it lacks) in front of it. Steps run
as a pipeline, each consuming its predecessor's output, or (when none can) side by side as
one parallel step. Candidates are scored by how much of the intent they cover, how well
fields map, their length (shortest first), whether they follow the intent's order, and the
learned preference scores of their capabilities (which break near-ties).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from packetflow.planner.catalog import CapabilityInfo, FieldInfo
from packetflow.planner.text import Constant, IntentAnalysis, stem, terms

MAX_GOALS = 3
CANDIDATES = 8
NUMBER_WINDOW = 3  # words between a number in the intent and the field words it sets
MIN_COVERAGE = 0.5

# Weights of the score (see module docstring). Coverage dominates: a plan must first say
# what the intent asked for; the rest orders plans that do.
W_QUALITY = 0.3
W_STEP = 0.12
W_INVERSION = 0.35
W_PARALLEL = 0.25
W_WEAK_LINK = 0.3
W_PREFERENCE = 0.3
W_RELEVANCE = 0.1
W_EFFECT = 0.02
W_CLAUSE = 0.3  # per goal beyond the intent's clauses: one request, one goal
UNKNOWN_WEIGHT = 0.5  # of the rarest known term: a word no capability has
WEAK_LINK = 0.5
TYPE_ONLY = 0.3  # the quality of a binding by type alone
HEAD_WEIGHT = 2.0  # the first term of each clause (the verb of a request) weighs double

JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string",
              list: "array", dict: "object", type(None): "null"}
_ENUM_WORD_RE = re.compile(r"(\w+)\s*\(([^)]+)\)")


@dataclass(frozen=True)
class Source:
    """Where a value can come from: the input, an earlier step's output, or the intent."""

    expression: str  # JMESPath over the composition's scope
    field: FieldInfo
    origin: str  # input | step | intent
    step: int | None = None  # index of the producing step
    label: str = ""

    @property
    def describe(self) -> str:
        """How explanations name it."""
        return self.label or self.expression


@dataclass(frozen=True)
class Binding:
    """One required (or intent-given) field of a step and the source it reads."""

    field: str
    source: Source
    quality: float
    reason: str


@dataclass(frozen=True)
class PlannedStep:
    """A capability in a plan, its bindings, and why it is there."""

    capability: CapabilityInfo
    bindings: tuple[Binding, ...]
    role: str  # goal | bridge
    covers: frozenset[str]

    @property
    def label(self) -> str:
        """The name its output is recorded under (``steps.LABEL``)."""
        return self.capability.name.replace("-", "_")


@dataclass(frozen=True)
class CandidatePlan:
    """A wired plan with its score and the parts the score is made of."""

    steps: tuple[PlannedStep, ...]
    form: str  # pipeline | parallel
    score: float
    parts: Mapping[str, float]
    covered: frozenset[str]


@dataclass(frozen=True)
class Unwired:
    """A capability that could not be fed, and which field lacked a source."""

    capability: str
    field: str
    detail: str


@dataclass
class SearchResult:
    """Every valid candidate, best first, and what stood in the way of the others."""

    plans: list[CandidatePlan]
    unwired: list[Unwired] = field(default_factory=list)
    uncovered: list[str] = field(default_factory=list)  # intent terms no capability has
    coverage: dict[str, float] = field(default_factory=dict)  # best plan's figure


# ----------------------------------------------------------------------------- sources


def input_fields(data: Mapping[str, Any]) -> list[Source]:
    """Sources for the user's input: one per top-level field, typed by its JSON value."""
    found = []
    for name, value in data.items():
        item_types = None
        if isinstance(value, list) and value:
            kinds = {JSON_TYPES.get(type(item), "object") for item in value}
            item_types = frozenset(kinds)
        info = FieldInfo(name, frozenset({JSON_TYPES.get(type(value), "object")}), item_types,
                         "", None, None, True, frozenset(terms(name)))
        found.append(Source(f"input.{_quoted_name(name)}", info, "input",
                            label=f"input.{name}"))
    return found


def _quoted_name(name: str) -> str:
    # A field name that is not a JMESPath identifier needs quoting to be addressed at all.
    return name if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) else orjson.dumps(name).decode()


def step_outputs(step: PlannedStep, index: int) -> list[Source]:
    """Sources for what a step provides."""
    return [Source(f"steps.{step.label}.{f.name}", f, "step", index,
                   f"{step.capability.name}.{f.name}")
            for f in step.capability.provides or ()]


def literal(value: Any) -> str:
    """A JMESPath literal for a JSON value."""
    return "`" + orjson.dumps(value).decode().replace("`", "\\`") + "`"


# ----------------------------------------------------------------------------- typing


def _accepts(wanted: frozenset[str] | None, have: frozenset[str] | None) -> bool:
    if wanted is None or have is None:
        return True
    if "number" in wanted:
        wanted = wanted | {"integer"}
    return (have - {"null"}) <= wanted


def compatible(source: FieldInfo, target: FieldInfo) -> bool:
    """Whether every value ``source`` can hold fits ``target`` (array items compared too)."""
    if not _accepts(target.types, source.types):
        return False
    if target.types is not None and "array" in target.types:
        return _accepts(target.item_types, source.item_types)
    return True


def link_quality(source: Source, target: FieldInfo, analysis: IntentAnalysis,
                 clause_start: int | None) -> float:
    """How well ``source`` fits ``target``: 1 for the same name, else by shared words (0.3
    for type alone), more when the intent names the source after the consumer's own words
    ("translate *the summary*")."""
    if source.field.name == target.name:
        return 1.0
    shared = len(source.field.words & target.words) / max(1, len(target.words))
    quality = 0.3 + 0.5 * min(1.0, 2 * shared)
    if source.origin == "step" and clause_start is not None:
        named = {stem(source.field.name)} | set(terms(source.field.name))
        if any(p >= clause_start for term in named for p in analysis.positions(term)):
            quality += 0.3
    return min(quality, 1.0)


# ----------------------------------------------------------------------------- the intent


def enum_words(target: FieldInfo) -> dict[str, Any]:
    """Words that stand for each enum value: the value itself and what its description
    gives in parentheses ("fr (French)")."""
    words: dict[str, Any] = {}
    for value in target.enum or ():
        words[str(value).lower()] = value
    for value, meaning in _ENUM_WORD_RE.findall(target.description):
        match = next((v for v in target.enum or () if str(v).lower() == value.lower()), None)
        if match is not None:
            for word in terms(meaning):
                words.setdefault(word, match)
    return words


def intent_value(target: FieldInfo, capability: CapabilityInfo, analysis: IntentAnalysis,
                 used: set[int]) -> tuple[Any, str] | None:
    """A value for ``target`` that the intent gives, with the reason; ``None`` if none.

    Only the intent's own words are read, never the user's data: data cannot choose values.
    """
    if target.enum is not None:
        words = enum_words(target)
        for term in analysis.terms:
            if term in words:
                return words[term], f"the intent says {term!r}"
        for word in analysis.words:
            if word in words:
                return words[word], f"the intent says {word!r}"
        return None
    kinds = target.types or frozenset()
    for constant in analysis.constants:
        if id(constant) in used:
            continue
        if constant.kind in ("email", "url") and _wants(target, constant.kind):
            used.add(id(constant))
            return constant.value, f"the intent names {constant.value}"
        if constant.kind == "number" and kinds & {"integer", "number"} and (
                "integer" not in kinds or isinstance(constant.value, int) or "number" in kinds
        ) and _near(constant, target, analysis):
            used.add(id(constant))
            return constant.value, f"the intent says {constant.value} next to " \
                                   f"{', '.join(sorted(target.words))}"
        if constant.kind == "quoted" and "string" in kinds:
            used.add(id(constant))
            return constant.value, f"the intent quotes {constant.value!r}"
    if "boolean" in kinds:
        hits = sorted(target.words & set(analysis.terms) - capability_head_words(capability))
        if hits:
            return True, f"the intent says {', '.join(hits)}"
    return None


def capability_head_words(capability: CapabilityInfo) -> frozenset[str]:
    """Words of the capability's name and intent: they choose the capability, not a flag."""
    return capability.head


def _wants(target: FieldInfo, kind: str) -> bool:
    if kind == "email":
        return target.format == "email" or "email" in target.words
    return target.format in ("uri", "url") or "url" in target.words


def _near(constant: Constant, target: FieldInfo, analysis: IntentAnalysis) -> bool:
    """Whether words of the field sit within a few words of the constant in the intent."""
    window = analysis.words[max(0, constant.position - NUMBER_WINDOW):
                            constant.position + NUMBER_WINDOW + 1]
    near = set(terms(" ".join(window)))
    return bool(near & target.words)


# ----------------------------------------------------------------------------- wiring


@dataclass
class _Wiring:
    bindings: list[Binding]
    missing: list[Unwired]


def wire(capability: CapabilityInfo, sources: Sequence[Source], analysis: IntentAnalysis,
         previous: int | None, clause_start: int | None) -> _Wiring:
    """Bind each field of ``capability``; with ``previous``, at least one binding must read
    that step's output (else it is reported missing as ``<chain>``)."""
    used: set[int] = set()
    missing: list[Unwired] = []
    options: dict[str, list[tuple[float, Source, str]]] = {}
    for target in capability.requires or ():
        choices = []
        for source in sources:
            if not compatible(source.field, target):
                continue
            same_name = source.field.name == target.name
            if source.origin == "input" and same_name:
                # The user named it: the strongest evidence there is.
                choices.append((1.0, source, "same name"))
                continue
            if not same_name and (target.enum is not None or not target.required):
                continue  # enums and optional fields take only a field of their own name
            quality = link_quality(source, target, analysis, clause_start)
            reason = "same name" if quality == 1.0 else (
                "matching words" if quality > 0.3 else "same type")
            choices.append((quality, source, reason))
        if not any(c[1].origin == "input" and c[0] == 1.0 for c in choices):
            given = intent_value(target, capability, analysis, used)
            if given is not None:
                value, reason = given
                choices.append((0.9, Source(literal(value), target, "intent",
                                            label=f"{value!r} from the intent"), reason))
        # Best fit; on a tie the latest step's output (a pipeline feeds forward).
        choices.sort(key=lambda c: (-c[0], c[1].origin != "step", -(c[1].step or 0)))
        if choices:
            options[target.name] = choices
        elif target.required:
            missing.append(Unwired(capability.name, target.name, _lack(target)))
    chosen = {name: choices[0] for name, choices in options.items()}
    if previous is not None and not any(s.step == previous for _, s, _ in chosen.values()):
        # The step must consume its predecessor: take the best link from it, if any.
        links = [(name, c) for name, choices in options.items() for c in choices
                 if c[1].step == previous]
        if links:
            name, choice = max(links, key=lambda nc: nc[1][0])
            chosen[name] = choice
        else:
            missing.append(Unwired(capability.name, "<chain>",
                                   "reads nothing the previous step provides"))
    bindings = [Binding(name, source, quality, reason)
                for name, (quality, source, reason) in chosen.items()]
    return _Wiring(bindings, missing)


def _lack(target: FieldInfo) -> str:
    kind = "/".join(sorted(target.types)) if target.types else "value"
    if target.enum is not None:
        return (f"one of {', '.join(map(str, target.enum))}: neither the input nor the "
                "intent gives it")
    return f"a {kind}: neither the input, an earlier step nor the intent gives one"


# ----------------------------------------------------------------------------- search


@dataclass(frozen=True)
class Context:
    """What every candidate is scored against."""

    analysis: IntentAnalysis
    catalog: Sequence[CapabilityInfo]
    relevance: Mapping[str, float]
    preference: Mapping[str, float]  # capability -> 0..1, 0.5 when nothing is known
    weights: Mapping[str, float]  # intent term -> weight
    max_steps: int


def term_weights(analysis: IntentAnalysis, catalog: Sequence[CapabilityInfo]
                 ) -> dict[str, float]:
    """Weight of each intent term: rarer among capabilities weighs more (idf); a term no
    capability has weighs half as much as a term only one capability has (it may be what is
    missing, or the request's subject matter); the first term of each clause weighs
    double."""
    count = len(catalog)
    weights: dict[str, float] = {}
    for term in set(analysis.terms):
        frequency = sum(1 for cap in catalog if term in cap.words)
        weights[term] = math.log(1 + (count - frequency + 0.5) / (frequency + 0.5)) \
            if frequency else -1.0
    rarest = math.log(1 + (count - 0.5) / 1.5)  # a term exactly one capability has
    weights = {term: (UNKNOWN_WEIGHT * rarest if w < 0 else w) for term, w in weights.items()}
    heads = {term for index, term in enumerate(analysis.terms)
             if index == 0 or analysis.clauses[index] != analysis.clauses[index - 1]}
    return {term: w * (HEAD_WEIGHT if term in heads else 1.0) for term, w in weights.items()}


def search(ctx: Context, sources: Sequence[Source]) -> SearchResult:
    """Candidate plans for the intent, best first."""
    analysis = ctx.analysis
    known = {t for t in analysis.terms if any(t in cap.words for cap in ctx.catalog)}
    uncovered = [t for t in dict.fromkeys(analysis.terms) if t not in known]
    ranked = sorted((cap for cap in ctx.catalog if ctx.relevance.get(cap.name, 0) > 0
                     and cap.words & known),
                    key=lambda cap: (-ctx.relevance[cap.name], cap.name))[:CANDIDATES]
    result = SearchResult([], uncovered=uncovered)
    seen: set[tuple[str, tuple[str, ...]]] = set()
    for size in range(1, min(MAX_GOALS, ctx.max_steps) + 1):
        for goals in itertools.combinations(ranked, size):
            if not _each_adds(goals, analysis):
                continue
            for order in itertools.permutations(goals):
                plan = _pipeline(ctx, order, sources, result.unwired)
                if plan is not None and _new(plan, seen):
                    result.plans.append(plan)
            if size > 1:
                plan = _parallel(ctx, goals, sources, result.unwired)
                if plan is not None and _new(plan, seen):
                    result.plans.append(plan)
    result.plans.sort(key=lambda p: (-p.score, len(p.steps),
                                     [s.capability.name for s in p.steps]))
    if result.plans:
        result.coverage = {"coverage": result.plans[0].parts["coverage"]}
    return result


def _new(plan: CandidatePlan, seen: set[tuple[str, tuple[str, ...]]]) -> bool:
    key = (plan.form, tuple(s.capability.name for s in plan.steps))
    if key in seen:
        return False
    seen.add(key)
    return True


def _each_adds(goals: Sequence[CapabilityInfo], analysis: IntentAnalysis) -> bool:
    """Every goal covers an intent term none of the others covers."""
    wanted = set(analysis.terms)
    for goal in goals:
        others = set().union(*(g.words for g in goals if g is not goal))
        if not (goal.words & wanted) - others:
            return False
    return True


def _clause_start(cap: CapabilityInfo, analysis: IntentAnalysis) -> int | None:
    positions = [i for i, t in enumerate(analysis.terms) if t in capability_head_words(cap)]
    return min(positions) if positions else None


def _pipeline(ctx: Context, order: Sequence[CapabilityInfo], sources: Sequence[Source],
              unwired: list[Unwired]) -> CandidatePlan | None:
    available = list(sources)
    steps: list[PlannedStep] = []
    for goal in order:
        previous = len(steps) - 1 if steps else None
        wiring = wire(goal, available, ctx.analysis, previous,
                      _clause_start(goal, ctx.analysis))
        # A field the user's input fills by type alone may want a bridge instead (a URL
        # given where HTML is required wants the page fetched).
        weak = [Unwired(goal.name, b.field, "same type only") for b in wiring.bindings
                if b.source.origin == "input" and b.quality <= TYPE_ONLY]
        if wiring.missing or weak:
            bridged = _bridge(ctx, goal, available, steps, wiring.missing or weak)
            if bridged is not None:
                bridge, wiring = bridged
                steps.append(bridge)
                available.extend(step_outputs(bridge, len(steps) - 1))
            elif wiring.missing:
                unwired.extend(wiring.missing)
                return None
        steps.append(_planned(goal, wiring, "goal", ctx.analysis))
        available.extend(step_outputs(steps[-1], len(steps) - 1))
        if len(steps) > ctx.max_steps:
            return None
    return _score(ctx, steps, "pipeline")


def _bridge(ctx: Context, goal: CapabilityInfo, available: list[Source],
            steps: list[PlannedStep], missing: list[Unwired]
            ) -> tuple[PlannedStep, _Wiring] | None:
    """One capability in front of ``goal`` that gives it what it lacks, best fit first."""
    if any(m.field == "<chain>" for m in missing) and steps:
        return None  # a bridge cannot make a goal read its predecessor
    best: tuple[float, PlannedStep, _Wiring] | None = None
    previous = len(steps) - 1 if steps else None
    lacking = [f for f in goal.requires or () if f.name in {m.field for m in missing}]
    for cap in ctx.catalog:
        if cap is goal or any(s.capability is cap for s in steps) or not any(
                out.name == f.name or out.words & f.words
                for out in cap.provides or () for f in lacking):
            continue
        bridge_wiring = wire(cap, available, ctx.analysis, previous, None)
        if bridge_wiring.missing or any(b.quality <= TYPE_ONLY and b.source.origin == "input"
                                        for b in bridge_wiring.bindings):
            continue  # a bridge must fit what it reads, not merely its type
        bridge = _planned(cap, bridge_wiring, "bridge", ctx.analysis)
        extended = [*available, *step_outputs(bridge, len(steps))]
        goal_wiring = wire(goal, extended, ctx.analysis, len(steps), None)
        if goal_wiring.missing:
            continue
        links = [b.quality for b in goal_wiring.bindings if b.source.step == len(steps)]
        if not links or max(links) < WEAK_LINK + 0.2:
            continue  # only a bridge whose output clearly is what the goal needs
        fit = max(links) + 0.1 * ctx.preference.get(cap.name, 0.5)
        if best is None or fit > best[0]:
            best = (fit, bridge, goal_wiring)
    return None if best is None else (best[1], best[2])


def _parallel(ctx: Context, goals: Sequence[CapabilityInfo], sources: Sequence[Source],
              unwired: list[Unwired]) -> CandidatePlan | None:
    steps = []
    for goal in goals:
        wiring = wire(goal, sources, ctx.analysis, None, None)
        if wiring.missing:
            unwired.extend(wiring.missing)
            return None
        steps.append(_planned(goal, wiring, "goal", ctx.analysis))
    # Branches in the order the intent asks for them.
    steps.sort(key=lambda s: (_clause_start(s.capability, ctx.analysis) or 0))
    return _score(ctx, steps, "parallel")


def _planned(cap: CapabilityInfo, wiring: _Wiring, role: str,
             analysis: IntentAnalysis) -> PlannedStep:
    return PlannedStep(cap, tuple(wiring.bindings), role, frozenset(cap.words & set(
        analysis.terms)))


def _score(ctx: Context, steps: Sequence[PlannedStep], form: str) -> CandidatePlan:
    covered = frozenset().union(*(s.covers for s in steps))
    total = sum(ctx.weights.values()) or 1.0
    coverage = sum(ctx.weights.get(t, 0.0) for t in covered) / total
    qualities = [b.quality for s in steps for b in s.bindings] or [1.0]
    quality = sum(qualities) / len(qualities)
    links = [max((b.quality for b in s.bindings if b.source.step == i - 1), default=0.0)
             for i, s in enumerate(steps) if i > 0 and form == "pipeline"]
    weak = sum(1 for q in links if q < WEAK_LINK)
    starts = [_clause_start(s.capability, ctx.analysis) for s in steps if s.role == "goal"]
    known = [p for p in starts if p is not None]
    inversions = sum(1 for a, b in itertools.combinations(known, 2) if a > b) \
        if form == "pipeline" else 0
    preference = sum(ctx.preference.get(s.capability.name, 0.5) for s in steps) / len(steps)
    relevance = sum(ctx.relevance.get(s.capability.name, 0.0) for s in steps) / len(steps)
    effects = sum(1 for s in steps if s.capability.effects)
    extra_goals = max(0, sum(1 for s in steps if s.role == "goal")
                      - max(1, ctx.analysis.clause_count))
    parts = {"coverage": coverage, "quality": quality, "steps": float(len(steps)),
             "inversions": float(inversions), "weakLinks": float(weak),
             "extraGoals": float(extra_goals),
             "preference": preference, "relevance": relevance}
    score = (coverage + W_QUALITY * quality - W_STEP * len(steps) - W_INVERSION * inversions
             - W_PARALLEL * (form == "parallel") - W_WEAK_LINK * weak
             + W_PREFERENCE * (preference - 0.5) + W_RELEVANCE * relevance
             - W_EFFECT * effects - W_CLAUSE * extra_goals)
    return CandidatePlan(tuple(steps), form, round(score, 6),
                         {k: round(v, 4) for k, v in parts.items()}, covered)


def acceptable(plan: CandidatePlan) -> bool:
    """Whether a plan says enough of what the intent asked for to be offered."""
    return plan.parts["coverage"] >= MIN_COVERAGE
