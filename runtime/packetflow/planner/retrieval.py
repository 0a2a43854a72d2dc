"""Which capabilities an intent is about: BM25 over their words, embeddings when installed.

BM25 (``packetflow.actors.bm25``, the memory search's ranker) always runs, over the stemmed
terms of each capability's name, intent and field names and descriptions. With the
``embeddings`` extra, the intent is also compared to each capability's name and intent by
sentence embeddings (``packetflow.actors.search``); the two rankings are fused, so a
paraphrase that shares no word with a capability can still find it.
"""

from __future__ import annotations

from collections.abc import Sequence

from packetflow.actors.bm25 import bm25_scores
from packetflow.planner.catalog import CapabilityInfo
from packetflow.planner.text import IntentAnalysis

SEMANTIC_WEIGHT = 0.5  # the best semantic match is worth half the best lexical one


def lexical_relevance(analysis: IntentAnalysis, catalog: Sequence[CapabilityInfo]
                      ) -> list[float]:
    """BM25 of each capability for the intent's terms, scaled so the best is 1.0."""
    scores = bm25_scores(" ".join(analysis.terms), [cap.document for cap in catalog])
    best = max(scores, default=0.0)
    return [score / best if best > 0 else 0.0 for score in scores]


def fused_relevance(lexical: Sequence[float], semantic_order: Sequence[int] | None
                    ) -> list[float]:
    """Lexical relevance plus a reciprocal-rank bonus for the semantic ranking (if any)."""
    fused = list(lexical)
    for rank, index in enumerate(semantic_order or ()):
        fused[index] += SEMANTIC_WEIGHT / (1 + rank)
    return fused


def semantic_texts(catalog: Sequence[CapabilityInfo]) -> list[str]:
    """What the embedding ranker compares the intent with: each name and intent."""
    return [f"{cap.name.replace('-', ' ')}: {cap.intent}" for cap in catalog]
