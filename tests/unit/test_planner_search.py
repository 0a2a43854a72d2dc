"""The planner's search on its own (pure): sources, typing, link quality, values the intent
gives, wiring, bridges, ranking, limits and the score's parts, with exact figures.

Inputs are built inside each test: mutation testing swaps a mutant in after import."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pytest

from packetflow.planner.catalog import CapabilityInfo, FieldInfo
from packetflow.planner.search import (
    CandidatePlan,
    Context,
    PlannedStep,
    Source,
    Unwired,
    _lack,
    acceptable,
    compatible,
    enum_words,
    input_fields,
    intent_value,
    link_quality,
    literal,
    search,
    step_outputs,
    term_weights,
    wire,
)
from packetflow.planner.text import analyse, terms
from packetflow.spec import Capability


def cap(name: str, intent: str, requires: dict[str, Any], provides: dict[str, Any],
        effects: tuple[str, ...] = ()) -> CapabilityInfo:
    """A capability as the planner sees it, from a manifest's spec."""
    return CapabilityInfo.of(Capability.model_validate({
        "apiVersion": "packetflow.io/v1alpha1", "kind": "Capability",
        "metadata": {"name": name},
        "spec": {"intent": intent, "requires": requires, "provides": provides,
                 "effects": list(effects),
                 "implementation": {"python": {"module": "m", "function": "f"}}}}))


def info(name: str, types: set[str] | None = None, items: set[str] | None = None, *,
         words: set[str] | None = None, description: str = "",
         enum: tuple[Any, ...] | None = None, format: str | None = None,
         required: bool = True) -> FieldInfo:
    """A field with exactly the words given (its name's terms by default)."""
    return FieldInfo(name, None if types is None else frozenset(types),
                     None if items is None else frozenset(items), description, enum, format,
                     required, frozenset(terms(name) if words is None else words))


def context(intent: str, catalog: list[CapabilityInfo], relevance: dict[str, float] | None = None,
            preference: dict[str, float] | None = None, max_steps: int = 4) -> Context:
    """What ``search`` is given: relevance 1 for every capability unless given."""
    analysis = analyse(intent)
    return Context(analysis, catalog,
                   relevance if relevance is not None else {c.name: 1.0 for c in catalog},
                   preference or {}, term_weights(analysis, catalog), max_steps)


def names(plan: CandidatePlan) -> list[str]:
    """The capabilities of a plan in order."""
    return [s.capability.name for s in plan.steps]


def wiring_of(plan: CandidatePlan) -> list[list[tuple[str, str, float, str]]]:
    """Each step's bindings: field, source expression, quality, reason."""
    return [[(b.field, b.source.expression, b.quality, b.reason) for b in s.bindings]
            for s in plan.steps]


# ----------------------------------------------------------------------------- sources


def test_input_fields_are_typed_by_their_json_values_and_quoted_when_needed() -> None:
    found = input_fields({"text": "x", "count": 2, "ratio": 0.5, "flag": True, "none": None,
                          "mixed": [1, "a"], "empty": [], "doc": {"a": 1},
                          "odd": (1,), "odd_items": [(1,)], "my-field": "y", "_ok9": "z",
                          "9lives": 1, "Upper": "u"})
    assert {(s.origin, s.step) for s in found} == {("input", None)}
    quoted = {"my-field": 'input."my-field"', "9lives": 'input."9lives"'}
    assert [(s.expression, s.label) for s in found] == [
        (quoted.get(name, f"input.{name}"), f"input.{name}")
        for name in ("text", "count", "ratio", "flag", "none", "mixed", "empty", "doc", "odd",
                     "odd_items", "my-field", "_ok9", "9lives", "Upper")]
    fields = {s.field.name: s.field for s in found}
    assert {n: (set(f.types or ()), f.item_types) for n, f in fields.items()} == {
        "text": ({"string"}, None), "count": ({"integer"}, None), "ratio": ({"number"}, None),
        "flag": ({"boolean"}, None), "none": ({"null"}, None),
        "mixed": ({"array"}, frozenset({"integer", "string"})), "empty": ({"array"}, None),
        "doc": ({"object"}, None), "odd": ({"object"}, None),
        "odd_items": ({"array"}, frozenset({"object"})), "my-field": ({"string"}, None),
        "_ok9": ({"string"}, None), "9lives": ({"integer"}, None),
        "Upper": ({"string"}, None)}
    assert fields["my-field"] == FieldInfo("my-field", frozenset({"string"}), None, "", None,
                                           None, True, frozenset({"field"}))
    assert [s.describe for s in found[:2]] == ["input.text", "input.count"]


def test_step_outputs_are_named_after_the_step_and_its_index() -> None:
    producer = cap("make-summary", "Summarise", {"text": {"type": "string"}},
                   {"summary": {"type": "string"}, "count": {"type": "integer"}})
    assert producer.provides is not None
    step = PlannedStep(producer, (), "goal", frozenset())
    assert step.label == "make_summary"
    assert [(s.expression, s.field, s.origin, s.step, s.label, s.describe)
            for s in step_outputs(step, 2)] == [
        ("steps.make_summary.summary", producer.provides[0], "step", 2, "make-summary.summary",
         "make-summary.summary"),
        ("steps.make_summary.count", producer.provides[1], "step", 2, "make-summary.count",
         "make-summary.count")]
    assert step_outputs(PlannedStep(replace(producer, provides=None), (), "goal",
                                    frozenset()), 0) == []


def test_literals_are_jmespath_json_literals() -> None:
    assert literal(2) == "`2`"
    assert literal("fr") == '`"fr"`'
    assert literal("a`b") == '`"a\\`b"`'
    assert literal([1, None]) == "`[1,null]`"


# ----------------------------------------------------------------------------- typing


@pytest.mark.parametrize(("source", "target", "fits"), [
    (info("a", {"integer"}), info("b", {"integer"}), True),
    (info("a", {"integer"}), info("b", {"number"}), True),  # every integer is a number
    (info("a", {"number"}), info("b", {"integer"}), False),
    (info("a", {"string"}), info("b", {"integer"}), False),
    (info("a", {"string", "null"}), info("b", {"string"}), True),  # null is absence
    (info("a", {"string", "integer"}), info("b", {"string"}), False),
    (info("a", {"string", "integer"}), info("b", {"string", "number"}), True),
    (info("a", None), info("b", {"string"}), True),  # untyped: cannot be ruled out
    (info("a", {"string"}), info("b", None), True),
    (info("a", {"array"}, {"string"}), info("b", {"array"}, {"string"}), True),
    (info("a", {"array"}, {"integer"}), info("b", {"array"}, {"string"}), False),
    (info("a", {"array"}, {"integer"}), info("b", {"array"}, {"number"}), True),
    (info("a", {"array"}, None), info("b", {"array"}, {"string"}), True),
    (info("a", {"array"}, {"integer"}), info("b", {"array"}, None), True),
    (info("a", {"array"}, {"integer"}), info("b", {"array", "string"}, {"string"}), False),
    (info("a", {"string"}, {"integer"}), info("b", {"string"}, {"string"}), True),
])
def test_compatible_means_every_source_value_fits(source: FieldInfo, target: FieldInfo,
                                                  fits: bool) -> None:
    assert compatible(source, target) is fits


def test_link_quality_by_name_then_shared_words_then_the_intents_naming() -> None:
    analysis = analyse("summarise the text then translate the summary")
    start = list(analysis.terms).index("translat")

    def step_source(name: str, words: set[str] | None = None) -> Source:
        return Source(f"steps.s.{name}", info(name, {"string"}, words=words), "step", 0)

    target = info("text", {"string"}, words={"text", "translat"})
    assert link_quality(step_source("text"), target, analysis, None) == 1.0
    # Half the target's words shared: 0.3 + 0.5 * min(1, 2 * 0.5).
    assert link_quality(step_source("body", {"text"}), target, analysis, None) == 0.8
    # A third: 0.3 + 0.5 * 2/3.
    three = info("x", {"string"}, words={"a", "b", "c"})
    assert link_quality(step_source("y", {"a"}), three, analysis, None) == pytest.approx(
        0.3 + 0.5 * 2 / 3)
    quarter = info("x", {"string"}, words={"a", "b", "c", "d"})
    assert link_quality(step_source("y", {"a"}), quarter, analysis, None) == 0.55
    one = info("x", {"string"}, words={"a"})
    assert link_quality(step_source("y", {"a"}), one, analysis, None) == 0.8
    nothing = info("x", {"string"}, words=set())
    assert link_quality(step_source("y", {"a"}), nothing, analysis, None) == pytest.approx(0.3)
    assert link_quality(step_source("y", {"q"}), three, analysis, None) == pytest.approx(0.3)
    # The intent names the step's output ("the summary") in the consumer's clause: +0.3.
    plain = info("text", {"string"}, words={"text", "a", "b", "c"})
    summary = step_source("summary", set())
    assert link_quality(summary, plain, analysis, None) == pytest.approx(0.3)
    assert link_quality(summary, plain, analysis, start) == pytest.approx(0.6)
    assert link_quality(summary, plain, analysis, start + 2) == pytest.approx(0.3)
    # At the clause's first term counts too; capped at 1.
    at_start = step_source("translate", set())
    assert link_quality(at_start, plain, analysis, start) == pytest.approx(0.6)
    assert link_quality(step_source("summary", {"text"}), plain, analysis,
                        start) == pytest.approx(0.85)
    assert link_quality(step_source("summary", {"text", "a"}), plain, analysis,
                        start) == 1.0
    # A field name of several words is named by any of its terms.
    assert link_quality(step_source("the_summary_text", set()), plain, analysis,
                        start) == pytest.approx(0.6)
    # The input is the user's, not an output the intent refers back to.
    given = Source("input.summary", info("summary", {"string"}, words=set()), "input")
    assert link_quality(given, plain, analysis, start) == pytest.approx(0.3)


# ----------------------------------------------------------------------------- the intent


def test_enum_words_are_the_values_and_the_words_their_description_gives() -> None:
    language = info("target_language", {"string"}, enum=("fr", "DE"),
                    description="fr (French), de (German), es (Spanish) or fr (France)")
    assert enum_words(language) == {"fr": "fr", "de": "DE", "french": "fr", "german": "DE",
                                    "franc": "fr"}
    # A described word that is already a value keeps that value.
    crossed = info("x", {"string"}, enum=("a", "b"), description="b (a)")
    assert enum_words(crossed) == {"a": "a", "b": "b"}
    assert enum_words(info("level", {"integer"}, enum=(1, 2))) == {"1": 1, "2": 2}
    assert enum_words(info("free", {"string"}, description="fr (French)")) == {}


def test_an_enum_takes_a_value_the_intent_says_or_the_word_for_it() -> None:
    owner = cap("translate-text", "Translate a text", {"text": {"type": "string"}}, {})
    language = info("target_language", {"string"}, enum=("fr", "de"),
                    description="fr (French) or de (German)")
    assert intent_value(language, owner, analyse("translate it into German 3"), set()) == (
        "de", "the intent says 'german'")
    assert intent_value(language, owner, analyse("translate it, fr please"), set()) == (
        "fr", "the intent says 'fr'")
    # A value that is no term (a digit) is found among the words.
    level = info("level", {"integer"}, enum=(1, 2, 3))
    assert intent_value(level, owner, analyse("compress at level 2"), set()) == (
        2, "the intent says '2'")
    # An enum takes nothing else the intent gives, not even a number next to its name.
    assert intent_value(level, owner, analyse("compress at level 7"), set()) is None
    assert intent_value(language, owner, analyse("translate it to Japanese"), set()) is None


def test_addresses_go_to_fields_that_want_them_once_each() -> None:
    owner = cap("send-mail", "Send a message", {}, {})
    analysis = analyse("mail bob@x.io and ann@y.io the page https://a.example/p")
    to = info("to", {"string"}, format="email", words={"recipient"})
    assert intent_value(to, owner, analysis, set()) == ("bob@x.io",
                                                        "the intent names bob@x.io")
    used: set[int] = set()
    assert intent_value(to, owner, analysis, used) == ("bob@x.io", "the intent names bob@x.io")
    assert intent_value(to, owner, analysis, used) == ("ann@y.io", "the intent names ann@y.io")
    assert intent_value(to, owner, analysis, used) is None
    by_word = info("address", {"string"}, words={"email", "address"})
    assert intent_value(by_word, owner, analysis, set())[0] == "bob@x.io"  # type: ignore[index]
    for link in (info("link", {"string"}, format="uri"), info("link", {"string"}, format="url"),
                 info("location", {"string"}, words={"url"})):
        assert intent_value(link, owner, analysis, set()) == (
            "https://a.example/p", "the intent names https://a.example/p")
    # A plain string wants no address.
    assert intent_value(info("title", {"string"}), owner, analysis, set()) is None
    assert intent_value(info("site", {"string"}, format="email"), owner,
                        analyse("see https://a.example"), set()) is None


def test_a_number_sets_a_field_whose_words_are_within_three_words() -> None:
    owner = cap("take-first", "Take the first items", {}, {})
    analysis = analyse("alpha beta gamma delta 5 epsilon zeta eta theta")
    for word, near in (("alpha", False), ("beta", True), ("delta", True), ("eta", True),
                       ("theta", False)):
        target = info("n", {"integer"}, words={word})
        expected = (5, f"the intent says 5 next to {word}") if near else None
        assert intent_value(target, owner, analysis, set()) == expected, word
    # Near the start of the intent the window is cut at the first word.
    early = analyse("limit 5 a b c d e f g h i j k")
    assert intent_value(info("n", {"integer"}, words={"limit"}), owner, early, set()) == (
        5, "the intent says 5 next to limit")
    # The field's words are listed sorted.
    both = info("n", {"number"}, words={"zeta", "beta"})
    assert intent_value(both, owner, analysis, set()) == (5, "the intent says 5 next to "
                                                             "beta, zeta")


def test_a_number_fits_the_fields_type_and_each_is_used_once() -> None:
    owner = cap("take-first", "Take the first items", {}, {})
    analysis = analyse("keep 2.5 or 3 items")
    count = info("count", {"integer"}, words={"keep", "item"})
    ratio = info("ratio", {"number"}, words={"keep", "item"})
    either = info("ratio", {"integer", "number"}, words={"keep", "item"})
    assert intent_value(count, owner, analysis, set()) == (3, "the intent says 3 next to "
                                                              "item, keep")
    assert intent_value(ratio, owner, analysis, set())[0] == 2.5  # type: ignore[index]
    assert intent_value(either, owner, analysis, set())[0] == 2.5  # type: ignore[index]
    used: set[int] = set()
    assert intent_value(ratio, owner, analysis, used)[0] == 2.5  # type: ignore[index]
    assert intent_value(ratio, owner, analysis, used)[0] == 3  # type: ignore[index]
    assert intent_value(ratio, owner, analysis, used) is None
    # Neither a string nor an untyped field takes a number.
    assert intent_value(info("name", {"string"}, words={"keep", "item"}), owner, analysis,
                        set()) is None
    assert intent_value(info("any", None, words={"keep", "item"}), owner, analysis,
                        set()) is None


def test_a_quoted_string_fills_a_string_field() -> None:
    owner = cap("search-text", "Search a text", {}, {})
    analysis = analyse("search for 'needle' and \"hay stack\" in 3 places")
    needle = info("query", {"string"})
    used: set[int] = set()
    assert intent_value(needle, owner, analysis, used) == ("needle",
                                                           "the intent quotes 'needle'")
    assert intent_value(needle, owner, analysis, used) == ("hay stack",
                                                           "the intent quotes 'hay stack'")
    assert intent_value(needle, owner, analysis, used) is None
    assert intent_value(info("count", {"integer"}), owner, analysis, set()) is None


def test_a_flag_is_set_by_its_words_but_not_by_the_capabilitys_own() -> None:
    owner = cap("strict-check", "Check strictly", {}, {})
    flag = info("flag", {"boolean"}, words=set(terms("strict verbose loud quiet")))
    assert intent_value(flag, owner, analyse("strict check, verbose and loud"), set()) == (
        True, "the intent says loud, verbos")
    assert intent_value(flag, owner, analyse("strict check"), set()) is None
    assert intent_value(info("flag", {"string"}, words={"verbos"}), owner,
                        analyse("check verbose"), set()) is None


# ----------------------------------------------------------------------------- wiring


def translator() -> CapabilityInfo:
    """Needs a text, a language the intent names, and an optional style."""
    return cap("translate-text", "Translate a text into another language",
               {"text": {"type": "string", "description": "the text to translate"},
                "target_language": {"type": "string", "enum": ["fr", "de"],
                                    "description": "fr (French) or de (German)"},
                "style": {"type": "string", "optional": True}},
               {"translation": {"type": "string", "description": "the translated text"}},
               effects=("billing",))


def test_wire_binds_by_name_then_the_intent_and_reports_what_is_missing() -> None:
    goal = translator()
    sources = input_fields({"text": "x", "other": "y"})
    wiring = wire(goal, sources, analyse("translate this to French"), None, None)
    assert [(b.field, b.source, b.quality, b.reason) for b in wiring.bindings] == [
        ("text", sources[0], 1.0, "same name"),
        ("target_language", Source('`"fr"`', goal.requires[1], "intent",  # type: ignore[index]
                                   label="'fr' from the intent"),
         0.9, "the intent says 'french'")]
    assert wiring.missing == []
    # The user's own field wins over what the intent says; an enum or an optional field
    # never takes a field of another name.
    given = input_fields({"text": "x", "target_language": "de", "language": "fr"})
    wiring = wire(goal, given, analyse("translate this to French"), None, None)
    assert [(b.field, b.source.expression, b.reason) for b in wiring.bindings] == [
        ("text", "input.text", "same name"),
        ("target_language", "input.target_language", "same name")]
    wiring = wire(goal, input_fields({"text": "x", "language": "fr"}),
                  analyse("translate this"), None, None)
    assert [b.field for b in wiring.bindings] == ["text"]
    assert wiring.missing == [Unwired("translate-text", "target_language",
                                      "one of fr, de: neither the input nor the intent "
                                      "gives it")]
    wiring = wire(goal, input_fields({"count": 2}), analyse("translate to German"), None, None)
    assert wiring.missing == [Unwired("translate-text", "text", "a string: neither the input, "
                                      "an earlier step nor the intent gives one")]
    assert [(b.field, b.source.expression) for b in wiring.bindings] == [
        ("target_language", '`"de"`')]


def test_what_is_lacking_names_the_types() -> None:
    assert _lack(info("n", {"number", "integer"})) == (
        "a integer/number: neither the input, an earlier step nor the intent gives one")
    assert _lack(info("n", None)) == (
        "a value: neither the input, an earlier step nor the intent gives one")
    assert _lack(info("n", {"integer"}, enum=(1, 2))) == (
        "one of 1, 2: neither the input nor the intent gives it")


def test_wire_prefers_the_latest_step_on_a_tie_and_says_why() -> None:
    reader = cap("read-text", "Read a text", {"text": {"type": "string"}}, {})
    body = Source("input.body", info("body", {"string"}), "input")
    early = Source("steps.a.out", info("out", {"string"}), "step", 0)
    late = Source("steps.b.res", info("res", {"string"}), "step", 1)
    analysis = analyse("read it")
    for sources in ([body, early, late], [late, early, body], [early, body, late]):
        wiring = wire(reader, sources, analysis, None, None)
        assert [(b.source, b.quality, b.reason) for b in wiring.bindings] == [
            (late, 0.3, "same type")]
    assert [b.source for b in wire(reader, [body, early], analysis, None,
                                   None).bindings] == [early]
    named = Source("steps.a.text", info("text", {"string"}), "step", 0)
    worded = Source("steps.b.body", info("body", {"string"}, words={"text"}), "step", 1)
    assert [(b.source, b.quality, b.reason) for b in wire(reader, [worded, named], analysis,
                                                          None, None).bindings] == [
        (named, 1.0, "same name")]
    assert [(b.quality, b.reason) for b in wire(reader, [worded], analysis, None,
                                                None).bindings] == [(0.8, "matching words")]


def test_wire_makes_a_step_read_its_predecessor_by_its_best_link() -> None:
    goal = cap("titled-text", "Title a text", {"text": {"type": "string"},
                                               "title": {"type": "string"}}, {})
    sources = [*input_fields({"text": "x", "title": "t"}),
               Source("steps.a.header", info("header", {"string"}), "step", 0),
               Source("steps.a.title_line", info("title_line", {"string"}), "step", 0)]
    analysis = analyse("title it")
    wiring = wire(goal, sources, analysis, None, None)
    assert [(b.field, b.source.expression) for b in wiring.bindings] == [
        ("text", "input.text"), ("title", "input.title")]
    wiring = wire(goal, sources, analysis, 0, None)
    assert [(b.field, b.source.expression, b.quality) for b in wiring.bindings] == [
        ("text", "input.text", 1.0), ("title", "steps.a.title_line", 0.8)]
    assert wiring.missing == []
    # Nothing of the predecessor fits: the chain is missing.
    wiring = wire(goal, [*sources[:2], Source("steps.a.n", info("n", {"integer"}), "step", 0)],
                  analysis, 0, None)
    assert [b.source.expression for b in wiring.bindings] == ["input.text", "input.title"]
    assert wiring.missing == [Unwired("titled-text", "<chain>",
                                      "reads nothing the previous step provides")]
    # Already reading it: nothing changes.
    reads = [Source("steps.b.text", info("text", {"string"}), "step", 1), *sources]
    assert [b.source.expression for b in wire(goal, reads, analysis, 1, None).bindings] == [
        "steps.b.text", "input.title"]


# ----------------------------------------------------------------------------- search


def summarizer() -> CapabilityInfo:
    """Summarises a text."""
    return cap("summarize-text", "Summarise a text",
               {"text": {"type": "string", "description": "the text to summarise"}},
               {"summary": {"type": "string", "description": "the summary"}})


def test_term_weights_are_idf_with_unknown_terms_at_half_and_heads_doubled() -> None:
    catalog = [summarizer(), translator()]
    analysis = analyse("summarise this text and translate the summary to French, in Klingon")
    assert analysis.terms == ("summar", "text", "translat", "summar", "french", "klingon")
    one = math.log(1 + 1.5 / 1.5)  # a term one of the two capabilities has
    assert term_weights(analysis, catalog) == pytest.approx({
        "summar": 2 * one, "text": math.log(1 + 0.5 / 2.5), "translat": 2 * one,
        "french": one, "klingon": 2 * 0.5 * one})
    assert term_weights(analyse("text"), [summarizer()]) == pytest.approx(
        {"text": 2 * math.log(1 + 0.5 / 1.5)})


def test_search_ranks_every_candidate_by_its_exact_score() -> None:
    catalog = [summarizer(), translator()]
    ctx = context("summarise this text and translate the summary to French", catalog,
                  {"summarize-text": 0.8, "translate-text": 1.0}, {"translate-text": 0.9})
    found = search(ctx, input_fields({"text": "x"}))
    # Weights: summar and translat 2 ln 2 (heads), french ln 2, text ln 1.2.
    total = 5 * math.log(2) + math.log(1.2)
    alone = (3 * math.log(2) + math.log(1.2)) / total
    summary = (2 * math.log(2) + math.log(1.2)) / total
    assert [(p.form, names(p), p.score) for p in found.plans] == [
        ("pipeline", ["summarize-text", "translate-text"],
         round(1 + 0.3 * 2.5 / 3 - 0.24 + 0.3 * 0.2 + 0.1 * 0.9 - 0.02, 6)),
        ("pipeline", ["translate-text"],
         round(alone + 0.3 * 0.95 - 0.12 + 0.3 * 0.4 + 0.1 - 0.02, 6)),
        ("parallel", ["summarize-text", "translate-text"],
         round(1 + 0.3 * 2.9 / 3 - 0.24 - 0.25 + 0.3 * 0.2 + 0.1 * 0.9 - 0.02, 6)),
        ("pipeline", ["translate-text", "summarize-text"],
         round(1 + 0.3 * 0.9 - 0.24 - 0.35 + 0.3 * 0.2 + 0.1 * 0.9 - 0.02, 6)),
        ("pipeline", ["summarize-text"],
         round(summary + 0.3 - 0.12 + 0.1 * 0.8, 6))]
    best, alone_plan = found.plans[0], found.plans[1]
    assert dict(best.parts) == {"coverage": 1.0, "quality": 0.8333, "steps": 2.0,
                                "inversions": 0.0, "weakLinks": 0.0, "extraGoals": 0.0,
                                "preference": 0.7, "relevance": 0.9}
    assert dict(alone_plan.parts) == {"coverage": round(alone, 4), "quality": 0.95,
                                      "steps": 1.0, "inversions": 0.0, "weakLinks": 0.0,
                                      "extraGoals": 0.0, "preference": 0.9, "relevance": 1.0}
    assert found.plans[3].parts["inversions"] == 1.0
    assert wiring_of(best) == [
        [("text", "input.text", 1.0, "same name")],
        [("text", "steps.summarize_text.summary", 0.6, "matching words"),
         ("target_language", '`"fr"`', 0.9, "the intent says 'french'")]]
    assert [(s.role, sorted(s.covers)) for s in best.steps] == [
        ("goal", ["summar", "text"]), ("goal", ["french", "text", "translat"])]
    assert best.covered == frozenset({"summar", "text", "translat", "french"})
    assert found.coverage == {"coverage": 1.0}
    assert found.unwired == [] and found.uncovered == []
    assert [acceptable(p) for p in found.plans] == [True, True, True, True, False]


def test_one_request_wants_one_goal_and_a_weak_link_costs() -> None:
    catalog = [summarizer(), translator()]
    ctx = context("summarise translated text in french", catalog)
    found = search(ctx, input_fields({"text": "x"}))
    half = (2 * math.log(2) + math.log(1.2)) / (4 * math.log(2) + math.log(1.2))
    # The two two-step pipelines tie: the names decide.
    assert [(p.form, names(p), p.score) for p in found.plans] == [
        ("pipeline", ["summarize-text"], round(half + 0.3 - 0.12 + 0.1, 6)),
        ("pipeline", ["translate-text"], round(half + 0.3 * 0.95 - 0.12 + 0.1 - 0.02, 6)),
        ("parallel", ["summarize-text", "translate-text"],
         round(1 + 0.3 * 2.9 / 3 - 0.24 - 0.25 + 0.1 - 0.02 - 0.3, 6)),
        ("pipeline", ["summarize-text", "translate-text"],
         round(1 + 0.3 * 2.2 / 3 - 0.24 - 0.3 + 0.1 - 0.02 - 0.3, 6)),
        ("pipeline", ["translate-text", "summarize-text"],
         round(1 + 0.3 * 0.9 - 0.24 - 0.35 + 0.1 - 0.02 - 0.3, 6))]
    assert [(p.parts["weakLinks"], p.parts["extraGoals"]) for p in found.plans] == [
        (0.0, 0.0), (0.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.0, 1.0)]
    assert found.plans[3].score == found.plans[4].score
    assert found.coverage == {"coverage": round(half, 4)}


def web_toolbox() -> list[CapabilityInfo]:
    """A goal that wants HTML, and would-be bridges of which only two really fit."""
    page = {"url": {"type": "string", "format": "uri", "description": "the page address"}}
    html = {"html": {"type": "string", "description": "the html of the page"}}
    return [
        cap("extract-links", "Extract the links of a page",
            {"html": {"type": "string", "description": "the html source of the page"}},
            {"links": {"type": "array", "items": {"type": "string"}}}),
        cap("deep-crawl", "Crawl a site", {**page, "depth": {"type": "integer"}}, html),
        cap("scrape-address", "Scrape", {"address": {"type": "string"}}, html),
        cap("page-text", "Text of a page", page,
            {"content": {"type": "string", "description": "page"}}),
        cap("word-count", "Count words", page, {"count": {"type": "integer"}}),
        cap("fetch-page", "Fetch a web page", page, html, effects=("network",)),
        cap("render-page", "Render a web page", page, html),
    ]


def test_a_field_filled_by_type_alone_gets_the_bridge_that_produces_it() -> None:
    catalog = web_toolbox()
    data = input_fields({"url": "https://x.example"})
    intent = "extract the links on this web page"
    found = search(context(intent, catalog, {"extract-links": 1.0}, {"render-page": 0.6}), data)
    assert [(names(p), [s.role for s in p.steps], p.score) for p in found.plans] == [
        (["render-page", "extract-links"], ["bridge", "goal"],
         round(1 + 0.3 - 0.24 + 0.3 * 0.05 + 0.1 * 0.5, 6))]
    assert wiring_of(found.plans[0]) == [[("url", "input.url", 1.0, "same name")],
                                         [("html", "steps.render_page.html", 1.0, "same name")]]
    assert found.plans[0].covered == frozenset({"find", "link", "web", "pag"})
    # Equally preferred: the first in the catalog.
    found = search(context(intent, catalog, {"extract-links": 1.0}), data)
    assert [names(p) for p in found.plans] == [["fetch-page", "extract-links"]]
    assert found.plans[0].score == round(1 + 0.3 - 0.24 + 0.05 - 0.02, 6)
    # No bridge that fits: the weak binding stands.
    unfit = [c for c in catalog if c.name not in ("fetch-page", "render-page")]
    found = search(context(intent, unfit, {"extract-links": 1.0}), data)
    assert [wiring_of(p) for p in found.plans] == [[[("html", "input.url", 0.3, "same type")]]]
    # A bridge counts as a step.
    assert search(context(intent, catalog, {"extract-links": 1.0}, max_steps=1),
                  data).plans == []


def test_a_bridge_that_is_also_a_goal_makes_one_plan_not_two() -> None:
    catalog = web_toolbox()
    found = search(context("fetch the links on this web page", catalog,
                           {"extract-links": 1.0, "fetch-page": 0.5}),
                   input_fields({"url": "https://x.example"}))
    assert [(p.form, names(p), [s.role for s in p.steps]) for p in found.plans] == [
        ("pipeline", ["fetch-page", "extract-links"], ["bridge", "goal"]),
        ("pipeline", ["fetch-page"], ["goal"]),
        ("parallel", ["fetch-page", "extract-links"], ["goal", "goal"])]


def test_a_missing_field_gets_a_bridge_or_is_reported() -> None:
    splitter = cap("split-lines", "Split a text into lines", {"text": {"type": "string"}},
                   {"items": {"type": "array", "items": {"type": "string"}}})
    wrong = cap("split-words", "Split a text into words", {"text": {"type": "string"}},
                {"items": {"type": "integer"}})
    counter = cap("count-items", "Count the items of a list",
                  {"items": {"type": "array", "items": {"type": "string"}}},
                  {"count": {"type": "integer"}})
    data = input_fields({"text": "a\nb"})
    # A would-be bridge whose output does not fit is passed over for the next.
    found = search(context("count the items", [counter, wrong, splitter],
                           {"count-items": 1.0}), data)
    assert [wiring_of(p) for p in found.plans] == [[
        [("text", "input.text", 1.0, "same name")],
        [("items", "steps.split_lines.items", 1.0, "same name")]]]
    found = search(context("count the items", [counter], {"count-items": 1.0}), data)
    assert found.plans == [] and found.coverage == {}
    assert found.unwired == [Unwired("count-items", "items", "a array: neither the input, an "
                                     "earlier step nor the intent gives one")]


def test_only_relevant_capabilities_with_known_terms_are_candidates() -> None:
    catalog = [summarizer(), translator(),
               cap("zip-file", "Compress a file", {"file": {"type": "string"}}, {})]
    found = search(context("frobnicate the summary, zork it and frobnicate", catalog,
                           {"summarize-text": 0.5, "translate-text": 0.0, "zip-file": 1.0}),
                   input_fields({"text": "x"}))
    assert found.uncovered == ["frobnicat", "zork"]
    assert [names(p) for p in found.plans] == [["summarize-text"]]
    found = search(context("translate the summary", catalog, {"summarize-text": 0.5}),
                   input_fields({"text": "x"}))
    assert [names(p) for p in found.plans] == [["summarize-text"]]


def greek(names_: list[str]) -> list[CapabilityInfo]:
    """One capability per word, each passing a text on."""
    return [cap(f"{n}-tool", f"{n.title()} a text", {"text": {"type": "string"}},
                {"text": {"type": "string"}}) for n in names_]


def test_at_most_eight_candidates_the_most_relevant_first() -> None:
    letters = ["iota", "alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    intent = " ".join(letters)
    data = input_fields({"text": "x"})
    found = search(context(intent, greek(letters), max_steps=1), data)
    assert sorted(p.steps[0].capability.name for p in found.plans) == [
        f"{n}-tool" for n in sorted(letters) if n != "zeta"]
    relevance = {f"{n}-tool": 0.5 for n in letters} | {"alpha-tool": 0.1, "zeta-tool": 0.9}
    found = search(context(intent, greek(letters), relevance, max_steps=1), data)
    assert sorted(p.steps[0].capability.name for p in found.plans) == [
        f"{n}-tool" for n in sorted(letters) if n != "alpha"]
    # Of the equally covering rest, the most relevant ranks first.
    assert names(found.plans[1]) == ["zeta-tool"]
    # A capability that has none of the intent's terms takes no candidate's place.
    unrelated = cap("zip-file", "Compress a file", {"text": {"type": "string"}}, {})
    relevance = {f"{n}-tool": 0.5 for n in letters} | {"zip-file": 1.0}
    found = search(context(intent, [unrelated, *greek(letters)], relevance, max_steps=1), data)
    assert sorted(p.steps[0].capability.name for p in found.plans) == [
        f"{n}-tool" for n in sorted(letters) if n != "zeta"]


def test_at_most_three_goals_and_never_more_steps_than_allowed() -> None:
    letters = ["alpha", "beta", "gamma", "delta"]
    intent = ", ".join(letters)
    data = input_fields({"text": "x"})
    found = search(context(intent, greek(letters), max_steps=5), data)
    assert len(found.plans) == 4 + 6 * 3 + 4 * 7
    assert max(len(p.steps) for p in found.plans) == 3
    assert len({(p.form, tuple(names(p))) for p in found.plans}) == len(found.plans)
    found = search(context(intent, greek(letters), max_steps=2), data)
    assert len(found.plans) == 4 + 6 * 3
    assert names(found.plans[0]) == ["alpha-tool", "beta-tool"]
    found = search(context(intent, greek(letters), max_steps=1), data)
    assert sorted(names(p)[0] for p in found.plans) == [f"{n}-tool" for n in sorted(letters)]


def test_every_goal_must_add_a_term_the_others_do_not_cover() -> None:
    catalog = [*greek(["alpha", "beta"]),
               cap("alpha-beta", "Alpha beta", {"text": {"type": "string"}},
                   {"text": {"type": "string"}})]
    found = search(context("alpha, beta", catalog, max_steps=3), input_fields({"text": "x"}))
    assert sorted((p.form, tuple(names(p))) for p in found.plans) == [
        ("parallel", ("alpha-tool", "beta-tool")),
        ("pipeline", ("alpha-beta",)), ("pipeline", ("alpha-tool",)),
        ("pipeline", ("alpha-tool", "beta-tool")), ("pipeline", ("beta-tool",)),
        ("pipeline", ("beta-tool", "alpha-tool"))]


def test_parallel_branches_follow_the_intent_and_a_branch_without_input_fails_it() -> None:
    catalog = [translator(), summarizer()]
    found = search(context("summarise the text, translate it to German", catalog,
                           {"translate-text": 1.0, "summarize-text": 0.9}),
                   input_fields({"text": "x"}))
    parallel = [p for p in found.plans if p.form == "parallel"]
    assert [names(p) for p in parallel] == [["summarize-text", "translate-text"]]
    found = search(context("summarise the text, translate it", catalog),
                   input_fields({"text": "x"}))
    assert [(p.form, names(p)) for p in found.plans] == [("pipeline", ["summarize-text"])]
    lack = Unwired("translate-text", "target_language",
                   "one of fr, de: neither the input nor the intent gives it")
    assert found.unwired == [lack] * 4


def test_an_irrelevant_capability_is_no_candidate() -> None:
    assert search(context("summarise the text", [summarizer()], {"summarize-text": 0.0}),
                  input_fields({"text": "x"})).plans == []


def test_what_the_intent_says_beats_an_input_field_of_the_same_type_only() -> None:
    taker = cap("take-first", "Take the first items",
                {"items": {"type": "array"}, "count": {"type": "integer"},
                 "limit": {"type": "integer"}}, {})
    wiring = wire(taker, input_fields({"items": [1], "n": 5, "limit": 9}),
                  analyse("take the first 3 items, count 4 limit"), None, None)
    assert [(b.field, b.source.expression, b.quality) for b in wiring.bindings] == [
        ("items", "input.items", 1.0), ("count", "`3`", 0.9), ("limit", "input.limit", 1.0)]


def test_a_plan_without_bindings_has_full_quality_and_half_coverage_is_enough() -> None:
    clock = cap("read-clock", "Read the clock", {}, {"now": {"type": "string"}})
    found = search(context("read the clock", [clock]), [])
    assert [(names(p), p.parts["quality"], p.score) for p in found.plans] == [
        (["read-clock"], 1.0, round(1 + 0.3 - 0.12 + 0.1, 6))]
    plan = found.plans[0]
    assert acceptable(replace(plan, parts={**plan.parts, "coverage": 0.5}))
    assert not acceptable(replace(plan, parts={**plan.parts, "coverage": 0.4999}))


def test_sources_are_described_by_label_or_expression() -> None:
    assert Source('input."my-field"', info("my-field"), "input",
                  label="input.my-field").describe == "input.my-field"
    assert Source("`3`", info("n"), "intent").describe == "`3`"


def test_a_bridge_between_goals_reads_the_step_before_it() -> None:
    catalog = [summarizer(),
               cap("publish-page", "Publish a page",
                   {"text": {"type": "string"}, "document": {"type": "object"}}, {}),
               cap("render-markdown", "Render markdown",
                   {"markdown": {"type": "string", "description": "the text to render"}},
                   {"rendered": {"type": "object", "description": "the document"}})]
    found = search(context("summarise the text, publish the page", catalog,
                           {"summarize-text": 1.0, "publish-page": 1.0}),
                   input_fields({"text": "x"}))
    chained = [p for p in found.plans if len(p.steps) == 3]
    assert [(names(p), [s.role for s in p.steps]) for p in chained] == [
        (["summarize-text", "render-markdown", "publish-page"], ["goal", "bridge", "goal"])]
    assert wiring_of(chained[0]) == [
        [("text", "input.text", 1.0, "same name")],
        [("markdown", "steps.summarize_text.summary", 0.3, "same type")],
        [("text", "input.text", 1.0, "same name"),
         ("document", "steps.render_markdown.rendered", 0.8, "matching words")]]


def test_a_bridge_cannot_stand_in_for_reading_the_previous_step() -> None:
    catalog = [cap("count-words", "Count the words", {"text": {"type": "string"}},
                   {"count": {"type": "integer"}}),
               cap("sort-items", "Sort items", {"text": {"type": "string"},
                                                "items": {"type": "array"}}, {}),
               cap("number-list", "Number list", {"count": {"type": "integer"}},
                   {"items": {"type": "array"}})]
    found = search(context("count the words, sort the items", catalog,
                           {"count-words": 1.0, "sort-items": 1.0}),
                   input_fields({"text": "x"}))
    assert [(p.form, names(p)) for p in found.plans] == [("pipeline", ["count-words"])]
    assert Unwired("sort-items", "<chain>",
                   "reads nothing the previous step provides") in found.unwired


def test_a_bridge_must_provide_what_the_goal_lacks() -> None:
    goal = cap("extract-links", "Extract the links of a page",
               {"html": {"type": "string"}, "title": {"type": "string"}}, {})
    titler = cap("make-title", "Make a title", {"url": {"type": "string"}},
                 {"title": {"type": "string"}})
    found = search(context("extract the links", [goal, titler], {"extract-links": 1.0}),
                   input_fields({"url": "https://x.example", "title": "t"}))
    assert [wiring_of(p) for p in found.plans] == [[[("html", "input.url", 0.3, "same type"),
                                                     ("title", "input.title", 1.0,
                                                      "same name")]]]


def test_a_later_goal_reads_a_bridges_output_by_its_step_index() -> None:
    catalog = [*web_toolbox(),
               cap("annotate-links", "Annotate links",
                   {"links": {"type": "array", "items": {"type": "string"}},
                    "html": {"type": "string"}}, {})]
    found = search(context("extract the links on this web page, annotate them", catalog,
                           {"extract-links": 1.0, "annotate-links": 0.9}),
                   input_fields({"url": "https://x.example"}))
    best = found.plans[0]
    assert names(best) == ["fetch-page", "extract-links", "annotate-links"]
    assert [[(b.source.expression, b.source.step) for b in s.bindings] for s in best.steps] == [
        [("input.url", None)], [("steps.fetch_page.html", 0)],
        [("steps.extract_links.links", 1), ("steps.fetch_page.html", 0)]]


def test_a_link_of_half_is_not_weak_and_a_shared_start_is_no_inversion() -> None:
    first = cap("alpha-tool", "Alpha", {"text": {"type": "string"}},
                {"zeta": {"type": "string"}})
    second = cap("beta-tool", "Beta", {"text": {"type": "string",
                                                "description": "zeta eta theta iota"}}, {})
    found = search(context("alpha the text, beta it", [first, second]),
                   input_fields({"text": "x"}))
    chained = [p for p in found.plans if names(p) == ["alpha-tool", "beta-tool"]
               and p.form == "pipeline"]
    assert [(wiring_of(p)[1], p.parts["weakLinks"]) for p in chained] == [
        ([("text", "steps.alpha_tool.zeta", 0.5, "matching words")], 0.0)]
    found = search(context("text: summarise, translate to french", [summarizer(), translator()]),
                   input_fields({"text": "x"}))
    assert [(names(p), p.parts["inversions"]) for p in found.plans if len(p.steps) == 2] == [
        (["translate-text", "summarize-text"], 0.0), (["summarize-text", "translate-text"], 0.0),
        (["summarize-text", "translate-text"], 0.0)]


def test_a_goal_chosen_by_its_field_words_alone_has_no_clause_start() -> None:
    publisher = cap("publish-page", "Publish",
                    {"text": {"type": "string", "description": "the markdown"}}, {})
    found = search(context("markdown please", [publisher]), input_fields({"text": "x"}))
    assert [(names(p), p.score) for p in found.plans] == [
        (["publish-page"], round(1 + 0.3 - 0.12 + 0.1, 6))]


def test_terms_without_a_weight_count_nothing() -> None:
    ctx = replace(context("summarise the text", [summarizer()]),
                  weights={"summar": 1.0, "other": 3.0})
    found = search(ctx, input_fields({"text": "x"}))
    assert [p.parts["coverage"] for p in found.plans] == [0.25]


def test_an_input_field_of_the_same_name_leaves_the_intents_values_to_others() -> None:
    box = cap("draw-box", "Draw a box", {"width": {"type": "integer"},
                                         "height": {"type": "integer"}}, {})
    wiring = wire(box, input_fields({"width": 3}), analyse("draw a width and height 7 box"),
                  None, None)
    assert [(b.field, b.source.expression) for b in wiring.bindings] == [
        ("width", "input.width"), ("height", "`7`")]
    assert wiring.missing == []


def test_a_bridge_needs_a_link_of_at_least_seven_tenths_and_preference_only_breaks_ties() -> None:
    goal = cap("extract-links", "Extract the links",
               {"html": {"type": "string", "description": "alpha beta gamma delta"}}, {})
    marker = cap("mark-up", "Mark up", {"url": {"type": "string"}},
                 {"markup": {"type": "string", "description": "html alpha"}})
    data = input_fields({"url": "https://x.example"})
    found = search(context("extract the links", [goal, marker], {"extract-links": 1.0}), data)
    assert [wiring_of(p) for p in found.plans] == [[
        [("url", "input.url", 1.0, "same name")],
        [("html", "steps.mark_up.markup", 0.7, "matching words")]]]
    goal = cap("extract-links", "Extract the links", {"html": {"type": "string"}}, {})
    fetcher = cap("fetch-page", "Fetch", {"url": {"type": "string"}},
                  {"html": {"type": "string"}})
    renderer = cap("render-page", "Render", {"url": {"type": "string"}},
                   {"markup": {"type": "string", "description": "html"}})
    found = search(context("extract the links", [goal, renderer, fetcher], {"extract-links": 1.0},
                           {"fetch-page": 0.0, "render-page": 1.0}), data)
    assert [names(p) for p in found.plans] == [["fetch-page", "extract-links"]]


def test_a_step_already_in_the_plan_is_never_its_bridge() -> None:
    measure = cap("measure-page", "Measure a page", {"n": {"type": "integer"}},
                  {"html_size": {"type": "integer", "description": "html size"}})
    extract = cap("extract-links", "Extract the links",
                  {"html": {"type": "string"}, "size": {"type": "integer"}}, {})
    found = search(context("measure the page, extract the links", [measure, extract]),
                   input_fields({"n": 1, "url": "https://x.example"}))
    assert [(p.form, names(p)) for p in found.plans] == [
        ("pipeline", ["measure-page", "extract-links"]), ("pipeline", ["measure-page"]),
        ("parallel", ["measure-page", "extract-links"])]
    assert wiring_of(found.plans[0])[1] == [
        ("html", "input.url", 0.3, "same type"),
        ("size", "steps.measure_page.html_size", 0.8, "matching words")]
