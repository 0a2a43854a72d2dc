"""``python -m bench planner``: the judging, and any intents file of the format runs."""

from __future__ import annotations

from pathlib import Path

import orjson

from bench.planner import contains, judged, run


def test_outputs_are_judged_by_containment_and_refusals_by_kind() -> None:
    assert contains({"a": 1, "b": {"c": [1, 2], "d": 0}}, {"b": {"c": [1, 2]}})
    assert not contains({"a": [1, 2, 3]}, {"a": [1, 2]})
    ran = {"kind": "planned", "executed": True, "blocked": "", "results": {"n": 1}}
    assert judged({"output": [{"n": 2}, {"n": 1}]}, ran)
    assert not judged({"output": {"n": 2}}, ran)
    assert not judged({"output": {"n": 1}}, {**ran, "error": "INTERNAL"})
    assert judged({"unsatisfiable": True}, {"kind": "no_plan"})
    assert judged({"blocked": True}, {"kind": "planned", "executed": False, "blocked": "x"})
    assert not judged({"blocked": True}, ran)


def test_any_intents_file_of_the_format_runs(tmp_path: Path) -> None:
    intents = tmp_path / "mine.json"
    intents.write_bytes(orjson.dumps({"intents": [
        {"id": "a", "intent": "reverse this text", "data": {"text": "ab"},
         "expect": {"output": {"text": "ba"}}},
        {"id": "b", "intent": "fly me to the moon", "data": {},
         "expect": {"unsatisfiable": True}, "split": "holdout"},
        {"id": "c", "intent": "echo this message", "data": {"message": "x"},
         "expect": {"output": {"message": "wrong"}}, "split": "holdout"},
    ]}))
    figures = run(["--intents", str(intents), "--no-embeddings"])
    assert figures["valid_rate"] == 1.0
    assert (figures["success_rate_dev"], figures["success_rate_holdout"]) == (1.0, 0.5)
    assert [f["id"] for f in figures["failures"]] == ["c"]
    assert figures["after_learning_success_rate"] >= figures["success_rate"]
    assert figures["cache_ratio_pairs"] == 7
