"""The federation's pure cores, without I/O: the Federation model, authorization and
catalogs, contract compatibility, rate limits, trust, SLA, pricing and the audit chain."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson
import pytest

from packetflow.contracts import contract_schema
from packetflow.federation.audit import (
    GENESIS,
    Anchor,
    AuditRecord,
    Chained,
    chain,
    link_hash,
    verify,
)
from packetflow.federation.catalog import (
    CatalogEntry,
    LocalCapability,
    catalog_for,
    catalog_version,
    check_compatible,
    contract_from_schema,
)
from packetflow.federation.pricing import Usage, call_price, invoice
from packetflow.federation.ratelimit import TokenBucket
from packetflow.federation.sla import Sample, SlaMeter, evaluate
from packetflow.federation.trust import (
    PERFORMANCE,
    RELIABILITY,
    SECURITY,
    Evidence,
    TrustBook,
    TrustParams,
    observe,
    score,
)
from packetflow.manifests import parse_document
from packetflow.spec import (
    FieldSchema,
    Pricing,
    RateLimit,
    Sla,
    TrustPolicy,
)
from tests.support.federation import issue_body, issue_federation

manifest = issue_body
federation = issue_federation


def errors(**changes: Any) -> list[str]:
    parsed = parse_document(manifest(**changes))
    assert isinstance(parsed, list)
    return [f"{e.path}: {e.message}" for e in parsed]


# ---------------------------------------------------------------------- the model

def test_the_issues_manifest_is_valid() -> None:
    spec = federation().spec
    assert [i.local_name for i in spec.imports] == ["globex-translate"]
    assert spec.exports[0].sla is not None and spec.exports[0].sla.probe is not None


@pytest.mark.parametrize(("changes", "expected"), [
    ({"exports": [{"capability": "x", "to": ["nobody"]}]},
     "spec: exports[0].to: unknown peer 'nobody'"),
    ({"imports": [{"peer": "nobody", "capability": "x"}]},
     "spec: imports[0].peer: unknown peer 'nobody'"),
    ({"trustDomain": "globex.example"}, "spec: peers: each trust domain (ours included)"),
    ({"identity": {"certFile": "a.crt"}}, "spec.identity: certFile and keyFile go together"),
    ({"identity": {}}, "spec.identity: exactly one of secretName, certFile+keyFile"),
    ({"trust": {"minimumScore": 0.95}},
     "spec.trust: initialScore below minimumScore would refuse every new peer"),
    ({"replicas": 2}, "spec.replicas: replicas > 1 needs a shared audit log"),
])
def test_invalid_federations_name_the_field(changes: dict[str, Any], expected: str) -> None:
    assert any(e.startswith(expected) for e in errors(**changes)), errors(**changes)


def test_pricing_takes_exactly_one_model() -> None:
    with pytest.raises(ValueError, match="exactly one of perExecution, subscription"):
        Pricing.model_validate({"perExecution": 1, "subscription": {"perMonth": 5}})


# ---------------------------------------------------------------------- catalogs

LOCAL = {
    "sentiment": LocalCapability("sentiment", "Score a text",
                                 {"text": FieldSchema(type="string")},
                                 {"score": FieldSchema(type="number")}, 10.0),
    "payroll": LocalCapability("payroll", "Pay people", None, None, 30.0),
}


def test_a_catalog_lists_only_exports_granted_to_the_caller() -> None:
    spec = federation().spec
    assert [e.capability for e in catalog_for(spec, "globex", LOCAL)] == ["sentiment"]
    assert [e.capability for e in catalog_for(spec, "initech", LOCAL)] == ["payroll"]
    assert catalog_for(spec, "stranger", LOCAL) == []
    # An export whose capability is not running here is not listed.
    assert catalog_for(spec, "globex", {}) == []


def test_catalog_entries_round_trip_and_version_by_content() -> None:
    spec = federation().spec
    entries = catalog_for(spec, "globex", LOCAL)
    again = [CatalogEntry.from_json(e.to_json()) for e in entries]
    assert again == entries
    assert catalog_version(again) == catalog_version(entries)
    changed = dataclasses.replace(entries[0], intent="Something else")
    assert catalog_version([changed]) != catalog_version(entries)


def test_contracts_survive_a_describe_round_trip() -> None:
    contract = {"a": FieldSchema(type="string"), "b": FieldSchema(type="integer", default=1),
                "c": FieldSchema(type="number", optional=True)}
    back = contract_from_schema(contract_schema(contract))
    assert back is not None
    assert contract_schema(back) == contract_schema(contract)
    assert contract_from_schema({"type": "object"}) is None


STR, INT, NUM = (FieldSchema(type=t) for t in ("string", "integer", "number"))
OPT = FieldSchema(type="string", optional=True)


@pytest.mark.parametrize(("local", "remote", "problem"), [
    (({"a": STR}, {"r": STR}), ({"a": STR}, {"r": STR}), None),
    (({"a": STR}, {"r": NUM}), ({"a": STR}, {"r": INT}), None),  # integers are numbers
    (({"a": STR}, None), ({"a": STR, "b": STR}, None), "requires.b: the peer requires this field"),
    (({"a": STR, "x": STR}, None), ({"a": STR}, None), "requires.x: the peer's contract has no"),
    (({"a": INT}, None), ({"a": STR}, None), "requires.a: local integer, the peer expects string"),
    ((None, {"r": STR}), (None, {"r": STR, "extra": STR}), "provides.extra: the peer returns it"),
    ((None, {"r": INT}), (None, {"r": NUM}), "provides.r: the peer returns number, local integer"),
    ((None, {"r": STR}), (None, {"r": OPT}), "provides.r: required locally"),
    ((None, None), ({"a": STR}, {"r": STR}), None),  # nothing declared locally: nothing to check
])
def test_contract_compatibility(local: tuple[Any, Any], remote: tuple[Any, Any],
                                problem: str | None) -> None:
    found = [f"{path}: {message}" for path, message in check_compatible(*local, *remote)]
    if problem is None:
        assert found == []
    else:
        assert any(f.startswith(problem) for f in found), found


# ---------------------------------------------------------------------- rate limits

def test_token_bucket_allows_the_burst_then_the_rate() -> None:
    bucket = TokenBucket.of(RateLimit(perMinute=60, burst=3), now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.retry_after() == pytest.approx(1.0)
    assert bucket.take(0.5) is False
    assert bucket.take(1.0) is True
    assert bucket.take(100.0) and bucket.tokens == pytest.approx(2.0)  # capped at the burst


def test_default_burst_is_a_tenth_of_a_minute() -> None:
    assert TokenBucket.of(RateLimit(perMinute=600), 0.0).capacity == 60
    assert TokenBucket.of(RateLimit(perMinute=3), 0.0).capacity == 1


# ---------------------------------------------------------------------- trust

PARAMS = TrustParams.of(TrustPolicy(minimumScore=0.8, halfLife="1h", initialScore=0.9,
                                    priorWeight=10, evidenceWindow="1m",
                                    maxEvidencePerWindow=5))


def test_a_new_peer_scores_the_prior() -> None:
    assert score(Evidence(), 0.0, PARAMS) == pytest.approx(0.9)


def test_failures_lower_the_score_and_decay_forgets_them() -> None:
    evidence = Evidence()
    for second in range(5):
        evidence = observe(evidence, False, float(second), PARAMS)
    low = score(evidence, 5.0, PARAMS)
    assert low == pytest.approx(9 / 15, abs=0.01)
    # One half-life later the failures weigh half as much.
    assert score(evidence, 3605.0, PARAMS) == pytest.approx(9 / 12.5, abs=0.01)
    assert score(evidence, 36000.0, PARAMS) == pytest.approx(0.9, abs=0.01)


def test_flooding_cheap_calls_cannot_inflate_a_score() -> None:
    honest, flood = Evidence(), Evidence()
    for _ in range(3):
        honest = observe(honest, False, 1.0, PARAMS)
        flood = observe(flood, False, 1.0, PARAMS)
    for _ in range(5):
        honest = observe(honest, True, 2.0, PARAMS)
    for _ in range(10_000):
        flood = observe(flood, True, 2.0, PARAMS)
    assert score(flood, 3.0, PARAMS) == pytest.approx(score(honest, 3.0, PARAMS))
    assert flood.capped == 10_000 - 5 and flood.observations == 10_003
    # The next window counts again (at most the cap).
    flood = observe(flood, True, 61.0, PARAMS)
    assert flood.window_positive == 1


def test_refusal_names_the_weakest_dimension() -> None:
    book = TrustBook(PARAMS)
    assert book.refusal("globex", 0.0) is None
    for second in range(4):
        book.observe("globex", PERFORMANCE, False, float(second))
    book.observe("globex", RELIABILITY, False, 0.0)
    reason = book.refusal("globex", 4.0)
    assert reason is not None and "on performance" in reason
    explained = book.explain("globex", 4.0)
    assert explained[PERFORMANCE]["observations"] == 4
    assert explained[PERFORMANCE]["negative"] == pytest.approx(4.0, abs=0.01)


def test_evidence_survives_a_restart() -> None:
    evidence = observe(Evidence(), True, 10.0, PARAMS)
    assert Evidence.from_json(evidence.to_json()) == evidence
    assert Evidence.from_json(Evidence().to_json()) == Evidence()


def test_params_come_from_the_policy() -> None:
    # Built here, not at import: mutation testing swaps the code in after imports.
    params = TrustParams.of(TrustPolicy(minimumScore=0.7, halfLife="2h", initialScore=0.85,
                                        priorWeight=12, evidenceWindow="90s",
                                        maxEvidencePerWindow=6))
    assert params == TrustParams(minimum=0.7, half_life_s=7200.0, initial=0.85,
                                 prior_weight=12, window_s=90.0, cap=6)


def test_each_observation_counts_once_on_its_side_from_its_time() -> None:
    good = observe(Evidence(), True, 100_000.0, PARAMS)
    assert (good.positive, good.negative, good.at) == (1.0, 0.0, 100_000.0)
    assert (good.window, good.window_positive, good.window_negative) == (99_960.0, 1, 0)
    bad = observe(good, False, 100_000.0, PARAMS)
    assert (bad.positive, bad.negative, bad.window_positive, bad.window_negative) == \
        (1.0, 1.0, 1, 1)
    # Decay runs from the last observation, not from time zero.
    assert score(bad, 100_000.0, PARAMS) == pytest.approx(10 / 12, rel=1e-9)


def test_a_half_life_halves_positive_evidence_too() -> None:
    book = TrustBook(PARAMS)
    book.observe("globex", RELIABILITY, True, 0.0)
    assert book.explain("globex", 3600.0)[RELIABILITY] == {
        "score": round(9.5 / 10.5, 4), "positive": 0.5, "negative": 0.0,
        "observations": 1, "capped": 0}


def test_explain_rounds_decayed_evidence_to_three_places_and_lists_it() -> None:
    book = TrustBook(PARAMS)
    book.observe("globex", RELIABILITY, True, 0.0)
    book.observe("globex", RELIABILITY, False, 0.0)
    half = 0.5 ** 0.5  # half a half-life later
    assert book.explain("globex", 1800.0)[RELIABILITY] == {
        "score": round((9 + half) / (10 + 2 * half), 4), "positive": 0.707,
        "negative": 0.707, "observations": 2, "capped": 0}
    book.observe("initech", PERFORMANCE, False, 5.0)
    assert {key: evidence.observations for key, evidence in book.items()} == {
        ("globex", RELIABILITY): 2, ("initech", PERFORMANCE): 1}


def test_the_cap_is_per_side_and_a_new_window_resets_both() -> None:
    evidence = Evidence()
    for _ in range(5):
        evidence = observe(evidence, True, 1.0, PARAMS)
    evidence = observe(evidence, False, 1.0, PARAMS)  # positives at the cap: still counted
    assert (evidence.window_negative, evidence.capped) == (1, 0)
    for _ in range(4):
        evidence = observe(evidence, False, 1.0, PARAMS)
    evidence = observe(evidence, False, 1.0, PARAMS)  # the sixth negative is left out
    assert (evidence.window_negative, evidence.capped) == (5, 1)
    evidence = observe(evidence, False, 61.0, PARAMS)
    assert (evidence.window, evidence.window_positive, evidence.window_negative) == (60.0, 0, 1)


def test_the_weakest_dimension_is_the_lowest_score_and_the_minimum_itself_passes() -> None:
    book = TrustBook(PARAMS)
    book.observe("globex", SECURITY, False, 0.0)
    book.observe("globex", SECURITY, False, 0.0)
    book.observe("globex", RELIABILITY, False, 0.0)
    assert book.lowest("globex", 0.0) == (SECURITY, pytest.approx(9 / 12))
    # A new peer scores exactly the prior, 0.9: at the minimum is not below it.
    at_minimum = TrustBook(dataclasses.replace(PARAMS, minimum=0.9))
    assert at_minimum.refusal("globex", 0.0) is None


def test_evidence_with_capped_observations_survives_a_restart() -> None:
    evidence = Evidence()
    for _ in range(7):
        evidence = observe(evidence, True, 1.0, PARAMS)
    assert evidence.capped == 2
    assert Evidence.from_json(evidence.to_json()) == evidence
    assert Evidence().to_json()["window"] is None  # JSON has no infinity


# ---------------------------------------------------------------------- SLA

SLA = Sla(latencyP99Ms=100, availability=99, window="10s")


def test_sla_evaluation_names_each_broken_objective() -> None:
    good = [Sample(0.0, 0.01, True)] * 99 + [Sample(0.0, 0.05, True)]
    assert evaluate(SLA, good).breaches == ()
    slow = [Sample(0.0, 0.5, True)] * 2 + [Sample(0.0, 0.01, False)]
    report = evaluate(SLA, slow)
    assert report.availability == pytest.approx(66.667)
    assert report.breaches == ("p99 latency 500.0 ms > 100 ms", "availability 66.67% < 99%")
    assert evaluate(SLA, []).breaches == ()


def test_sla_windows_close_and_count_breaches() -> None:
    meter = SlaMeter(SLA)
    assert meter.observe(Sample(1.0, 0.5, True)) is None
    assert meter.observe(Sample(2.0, 0.01, True)) is None
    report = meter.close(10.5)
    assert report is not None and report.calls == 2 and report.breaches
    assert meter.breaches == 1
    meter.observe(Sample(12.0, 0.01, True))
    assert meter.close(25.0) is not None and meter.breaches == 1


# ---------------------------------------------------------------------- pricing

def test_call_prices() -> None:
    per_call = Pricing(perExecution=0.002)
    share = Pricing.model_validate({"revenueShare": {"percent": 20, "field": "amount"}})
    assert call_price(per_call, True) == 0.002 and call_price(per_call, False) == 0.0
    assert call_price(share, True, {"amount": 50}) == pytest.approx(10.0)
    assert call_price(share, True, {"amount": "50"}) == 0.0
    assert call_price(None, True) == 0.0


def test_invoice_prices_each_model_over_the_period() -> None:
    usages = [Usage("inbound", "globex", cap, 1200, 1100, 100, 7, metered, "USD")
              for cap, metered in (("a", 2.2), ("b", 0.0), ("c", 44.0), ("d", 0.0))]
    pricing = {
        "a": Pricing(perExecution=0.002),
        "b": Pricing.model_validate({"subscription": {"perMonth": 300, "includedCalls": 1000,
                                                      "overagePerExecution": 0.01}}),
        "c": Pricing.model_validate({"revenueShare": {"percent": 10, "field": "x"}}),
    }
    lines = {line.usage.capability: line
             for line in invoice(usages, lambda u: pricing.get(u.capability), 30 * 86400.0)}
    assert (lines["a"].model, lines["a"].amount) == ("perExecution", 2.2)
    assert lines["b"].model == "subscription"
    assert lines["b"].amount == pytest.approx(300 + 100 * 0.01)
    assert (lines["c"].model, lines["c"].amount) == ("revenueShare", 44.0)
    assert (lines["d"].model, lines["d"].amount) == ("free", 0.0)
    half = invoice(usages[1:2], lambda u: pricing["b"], 15 * 86400.0)[0]
    assert half.amount == pytest.approx(150 + 600 * 0.01)


# ---------------------------------------------------------------------- audit chain

def records(count: int) -> list[Chained]:
    return chain([AuditRecord(at=float(i), direction="inbound", peer="globex",
                              fingerprint="f", capability="c", decision="allow", reason="",
                              code="OK", price=0.5) for i in range(count)], GENESIS, 1)


def test_a_records_hash_covers_every_field_in_sorted_order() -> None:
    # The canonical bytes never change: logs written by earlier versions still verify.
    record = AuditRecord(at=1.5, direction="inbound", peer="globex", fingerprint="f" * 64,
                         capability="c", decision="allow", reason="exported \u00e9 \"x\"",
                         code="OK", duration_ms=2.25, bytes_in=3, bytes_out=4, price=0.002,
                         currency="USD", trace_id="t", input_sha256="i", output_sha256="o",
                         address="127.0.0.1:1", notes="n")
    assert record.body() == orjson.dumps(dataclasses.asdict(record),
                                         option=orjson.OPT_SORT_KEYS)
    assert record.to_json() == dataclasses.asdict(record)


def test_an_intact_chain_verifies() -> None:
    rows = records(6)
    assert verify(rows) == []
    assert verify(rows, head=rows[3].hash) == []
    assert [r.prev_hash for r in rows[1:]] == [r.hash for r in rows[:-1]]


def test_edited_record_is_named() -> None:
    rows = records(6)
    rows[2] = dataclasses.replace(rows[2], record=dataclasses.replace(rows[2].record,
                                                                        price=0.0))
    assert [(f.kind, f.seq) for f in verify(rows)] == [("edited", 3)]


def test_edited_and_rehashed_record_is_named() -> None:
    rows = records(6)
    record = dataclasses.replace(rows[2].record, price=0.0)
    rows[2] = dataclasses.replace(rows[2], record=record,
                                  hash=link_hash(record, rows[2].prev_hash))
    assert [(f.kind, f.seq) for f in verify(rows)] == [("edited", 3)]


def test_deleted_record_is_named() -> None:
    rows = records(6)
    del rows[3]
    assert [(f.kind, f.seq) for f in verify(rows)] == [("deleted", 4)]


def test_inserted_record_is_named() -> None:
    rows = records(6)
    forged = AuditRecord(at=9.0, direction="inbound", peer="evil", fingerprint="",
                         capability="c", decision="allow", reason="", code="OK")
    inserted = Chained(4, forged, rows[2].hash, link_hash(forged, rows[2].hash))
    tampered = [*rows[:3], inserted, *(dataclasses.replace(r, seq=r.seq + 1)
                                       for r in rows[3:])]
    assert [(f.kind, f.seq) for f in verify(tampered)] == [("inserted", 4)]


def test_reordered_records_are_named() -> None:
    rows = records(6)
    rows[2], rows[3] = (dataclasses.replace(rows[3], seq=3), dataclasses.replace(rows[2], seq=4))
    assert [(f.kind, f.seq) for f in verify(rows)] == [("reordered", 3)]


def test_a_rewritten_tail_shows_against_the_published_head() -> None:
    rows = records(6)
    published = rows[-1].hash
    rewritten = rows[:3] + chain([dataclasses.replace(r.record, price=0.0) for r in rows[3:]],
                                 rows[2].hash, 4)
    assert verify(rewritten) == []
    assert [f.kind for f in verify(rewritten, head=published)] == ["head"]


def test_pruned_log_verifies_from_its_anchor() -> None:
    rows = records(6)
    anchor = Anchor(rows[2].seq, rows[2].hash)
    assert verify(rows[3:], anchor) == []
    assert [f.kind for f in verify(rows[4:], anchor)] == ["deleted"]


# ---------------------------------------------------------------------- the mesh picture

def test_imports_and_exports_are_federated_edges() -> None:
    from packetflow.graph import dependencies_of, mesh_of, render_dot
    from packetflow.manifests import load_text

    loaded = load_text(
        "apiVersion: packetflow.io/v1alpha1\nkind: Capability\nmetadata: {name: french}\n"
        "spec:\n  intent: x\n  implementation: {federated: {peer: globex, "
        "capability: translate}}\n")
    (dependency,) = dependencies_of(loaded.capabilities[0])
    assert (dependency.target, dependency.kind, dependency.external) == (
        "translate @ globex", "federated", True)
    mesh = mesh_of(loaded.capabilities, [], [federation()])
    edges = {(source, dep.target, dep.kind, dep.label) for source, dep in mesh.edges()}
    assert ("globex-translate", "translate @ globex", "federated", "import") in edges
    assert ("peer globex", "sentiment", "federated", "export") not in edges  # not served here
    assert mesh.nodes["peer globex"].kind == "peer"
    assert '"peer globex" [shape=house' in render_dot(mesh)
