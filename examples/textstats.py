"""The python implementation behind examples/text-stats.yaml."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from packetflow.context import CallContext

_WORD = re.compile(r"[A-Za-z']+")
_SENTENCE_END = re.compile(r"[.!?]+(?:\s|$)")


async def analyze(text: str, top: int, ctx: CallContext) -> dict[str, Any]:
    """Word and sentence counts plus the ``top`` most frequent words (longest first on ties)."""
    words = [w.lower() for w in _WORD.findall(text)]
    ctx.progress("counted words", 0.5)
    ranked = sorted(Counter(words).items(), key=lambda kv: (-kv[1], -len(kv[0]), kv[0]))
    sentences = len(_SENTENCE_END.findall(text)) or (1 if text.strip() else 0)
    return {"words": len(words), "sentences": sentences, "top_words": [w for w, _ in ranked[:top]]}
