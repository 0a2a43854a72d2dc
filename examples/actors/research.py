"""The research assistant actor: deterministic logic, no external model.

Each query picks a focus term, recalls related earlier queries from memory (BM25, or
embeddings when installed) and keeps a small knowledge map of how often each term came up.
The query's frequent words come from the ``text-stats`` capability, declared in the manifest's
``mcpTools`` as ``analyze`` and called with ``ctx.tools.call``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from packetflow.actors import ActorContext
from packetflow.errors import CapabilityNotFound

STOPWORDS = frozenset({
    "a", "an", "and", "are", "as", "at", "be", "by", "for", "from", "how", "i", "in", "is", "it",
    "of", "on", "or", "the", "to", "what", "when", "where", "which", "who", "why", "with",
    "about", "does", "do", "can", "my", "me", "we", "you"
})
HISTORY_KEPT = 50
KEYWORDS_ASKED = 5


def terms(text: str) -> list[str]:
    """Content words of a text, lower-cased."""
    words = ["".join(ch for ch in word if ch.isalnum()) for word in text.lower().split()]
    return [w for w in words if w and w not in STOPWORDS]


async def keywords(query: str, ctx: ActorContext) -> list[str]:
    """The query's most frequent content words, from the ``analyze`` tool (text-stats)."""
    try:
        stats = await ctx.tools.call("analyze", {"text": query, "top": KEYWORDS_ASKED})
    except CapabilityNotFound:
        # text-stats is not served beside this actor (e.g. the actor runs in its own pods):
        # the same idea, locally.
        return terms(query)
    return [word for word in stats["top_words"] if word not in STOPWORDS]


def pick_focus(candidates: list[str], knowledge: dict[str, int]) -> str:
    """The most telling candidate term: one seen before wins, then the longest."""
    return max(candidates or ["general"], key=lambda t: (knowledge.get(t, 0), len(t), t))


class ResearchAssistant:
    """One instance per active conversation (actor id)."""

    async def on_message(self, message: dict[str, Any], state: dict[str, Any],
                         ctx: ActorContext) -> tuple[dict[str, Any], dict[str, Any]]:
        """Answer a query using what earlier turns of this conversation found."""
        query = message["query"]
        related = [entry.text for entry in await ctx.memory.search(query, limit=3)
                   if entry.role == "user"]
        knowledge = Counter(state.get("knowledge") or {})
        focus = pick_focus(await keywords(query, ctx), dict(knowledge))
        knowledge.update(terms(query))
        ctx.memory.append(query, role="user", data={"focus": focus})
        history = [*state["research_history"], {"query": query, "focus": focus}]
        answer = (f"Researching {focus!r}: query {len(history)} of this conversation"
                  + (f"; related earlier: {'; '.join(related)}" if related else "."))
        ctx.memory.append(answer, role="assistant")
        new_state = {**state, "research_history": history, "current_focus": focus,
                     "knowledge": dict(knowledge)}
        return {"answer": answer, "focus": focus, "related": related,
                "turns": len(history)}, new_state

    def cleanup_old_research(self, state: dict[str, Any], ctx: ActorContext) -> dict[str, Any]:
        """Scheduled: keep only the newest research history entries."""
        return {**state, "research_history": state["research_history"][-HISTORY_KEPT:]}
