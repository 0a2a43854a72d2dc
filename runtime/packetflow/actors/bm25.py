"""BM25 ranking of short texts: the memory search that needs no model.

Pure functions over plain strings, so the same ranking serves every store.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

_TOKEN = re.compile(r"[^\W_]+", re.UNICODE)

# The usual Okapi parameters: term-frequency saturation and length normalisation.
K1 = 1.5
B = 0.75


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens (letters and digits, any script)."""
    return [token.lower() for token in _TOKEN.findall(text)]


def bm25_scores(query: str, documents: Sequence[str], k1: float = K1,
                b: float = B) -> list[float]:
    """The BM25 score of each document for ``query`` (0.0 where no query term occurs)."""
    terms = set(tokenize(query))
    docs = [Counter(tokenize(doc)) for doc in documents]
    if not terms or not docs:
        return [0.0] * len(docs)
    lengths = [sum(doc.values()) for doc in docs]
    average = sum(lengths) / len(docs) or 1.0
    count = len(docs)
    idf = {}
    for term in terms:
        frequency = sum(1 for doc in docs if term in doc)
        # The "+1" variant keeps idf positive when a term is in most documents.
        idf[term] = math.log(1 + (count - frequency + 0.5) / (frequency + 0.5))
    scores = []
    for doc, length in zip(docs, lengths, strict=True):
        score = 0.0
        for term in terms:
            tf = doc.get(term, 0)
            if tf:
                score += idf[term] * tf * (k1 + 1) / (tf + k1 * (1 - b + b * length / average))
        scores.append(score)
    return scores


def bm25_rank(query: str, documents: Sequence[str], limit: int) -> list[tuple[int, float]]:
    """Indices and scores of the best ``limit`` documents with a positive score, best first
    (ties: the later document, i.e. the more recent memory, first)."""
    scored = [(index, score) for index, score in enumerate(bm25_scores(query, documents))
              if score > 0]
    scored.sort(key=lambda pair: (-pair[1], -pair[0]))
    return scored[:limit]
