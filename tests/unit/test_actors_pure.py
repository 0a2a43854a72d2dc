"""Pure parts of actors: BM25, reminder slots, rendezvous placement, SQL placeholders."""

from __future__ import annotations

import pytest

from packetflow.actors.bm25 import bm25_rank, bm25_scores, tokenize
from packetflow.actors.context import seconds_of
from packetflow.actors.postgres_store import postgres_sql
from packetflow.actors.timing import next_due, rendezvous_owner


def test_tokenize_lowercases_words_of_any_script() -> None:
    assert tokenize("Graph-DBs, Straße & 42!") == ["graph", "dbs", "straße", "42"]


def test_bm25_prefers_rare_terms_and_ignores_unrelated_documents() -> None:
    docs = ["the cat sat on the mat", "the dog barked", "a cat and a dog", "quantum physics"]
    ranked = bm25_rank("cat mat", docs, limit=10)
    assert [index for index, _ in ranked] == [0, 2]
    assert bm25_scores("", docs) == [0.0] * 4
    assert bm25_rank("anything", [], 3) == []


def test_bm25_ties_favour_the_most_recent_document() -> None:
    assert [i for i, _ in bm25_rank("refund", ["refund please", "refund please"], 2)] == [1, 0]


def test_next_due_fires_once_for_a_missed_period_then_keeps_rhythm() -> None:
    assert next_due(100.0, 10.0, 100.0) == 110.0
    # Down for 95 s: nine slots were missed; the next one is the first in the future.
    assert next_due(100.0, 10.0, 195.0) == 200.0
    with pytest.raises(ValueError, match="positive"):
        next_due(0.0, 0.0, 1.0)


def test_rendezvous_moves_only_the_departed_members_keys() -> None:
    keys = [f"actor-{i}" for i in range(300)]
    three = {k: rendezvous_owner(k, ["m1", "m2", "m3"]) for k in keys}
    two = {k: rendezvous_owner(k, ["m1", "m2"]) for k in keys}
    assert set(three.values()) == {"m1", "m2", "m3"}
    assert all(two[k] == owner for k, owner in three.items() if owner != "m3")
    assert rendezvous_owner("x", []) is None


def test_seconds_of_accepts_numbers_and_durations_and_names_bad_ones() -> None:
    assert seconds_of("1m30s", "every") == 90.0
    assert seconds_of(0.5, "after") == 0.5
    with pytest.raises(ValueError, match="every: 'soon' is not a duration"):
        seconds_of("soon", "every")
    with pytest.raises(ValueError, match="after must be positive"):
        seconds_of(0, "after")


def test_postgres_placeholders() -> None:
    assert postgres_sql("SELECT ? WHERE a LIKE '5%'") == "SELECT %s WHERE a LIKE '5%%'"
