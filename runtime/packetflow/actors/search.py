"""Memory search: embeddings when the optional extra is installed, BM25 otherwise.

Both rankers take the query and the entries' texts and return indices, best first, so the
``ctx.memory.search`` API is the same either way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any, Protocol

from packetflow.actors.bm25 import bm25_rank

log = logging.getLogger("packetflow.actors.search")

EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


class Ranker(Protocol):
    """Ranks texts against a query."""

    name: str

    def rank(self, query: str, texts: Sequence[str], limit: int) -> list[int]:
        """Indices of the best ``limit`` texts, best first."""
        ...


class Bm25Ranker:
    """Lexical ranking: always available."""

    name = "bm25"

    def rank(self, query: str, texts: Sequence[str], limit: int) -> list[int]:
        """Indices of the best ``limit`` texts by BM25 (only texts sharing a term)."""
        return [index for index, _ in bm25_rank(query, texts, limit)]


class EmbeddingRanker:
    """Cosine similarity of sentence embeddings from a local model (no download at run time)."""

    name = "embeddings"

    def __init__(self, model: Any) -> None:
        self.model = model

    def rank(self, query: str, texts: Sequence[str], limit: int) -> list[int]:
        """Indices of the ``limit`` texts closest to the query."""
        if not texts:
            return []
        vectors = self.model.encode([query, *texts], normalize_embeddings=True)
        scores = vectors[1:] @ vectors[0]
        order = sorted(range(len(texts)), key=lambda i: (-float(scores[i]), -i))
        return order[:limit]


_embedding_ranker: Ranker | None = None


def ranker_for(semantic: bool) -> Ranker:
    """The ranker a type asked for; ``semanticSearch`` without the extra falls back to BM25."""
    global _embedding_ranker
    if not semantic:
        return Bm25Ranker()
    if _embedding_ranker is None:
        try:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from sentence_transformers import SentenceTransformer  # type: ignore[import-not-found]

            _embedding_ranker = EmbeddingRanker(SentenceTransformer(EMBEDDING_MODEL))
        except Exception as exc:  # missing extra, or the model is not on this machine
            log.info("semanticSearch: embeddings unavailable (%s); using BM25", exc)
            return Bm25Ranker()
    return _embedding_ranker
