"""The research assistant actor: deterministic logic, no external model.

Each query picks a focus term, recalls related earlier queries from memory (BM25, or
embeddings when installed) and keeps a small knowledge map of how often each term came up.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from packetflow.actors import ActorContext

STOPWORDS = frozenset({
    "a", "an", "and", "are", "as", "at", "be", "by", "for", "from", "how", "i", "in", "is", "it",
    "of", "on", "or", "the", "to", "what", "when", "where", "which", "who", "why", "with",
    "about", "does", "do", "can", "my", "me", "we", "you"
})
HISTORY_KEPT = 50


def terms(text: str) -> list[str]:
    """Content words of a text, lower-cased."""
    words = ["".join(ch for ch in word if ch.isalnum()) for word in text.lower().split()]
    return [w for w in words if w and w not in STOPWORDS]


def pick_focus(query: str, knowledge: dict[str, int]) -> str:
    """The query's most telling term: one seen before wins, then the longest."""
    candidates = terms(query) or ["general"]
    return max(candidates, key=lambda t: (knowledge.get(t, 0), len(t), t))


class ResearchAssistant:
    """One instance per active conversation (actor id)."""

    async def on_message(self, message: dict[str, Any], state: dict[str, Any],
                         ctx: ActorContext) -> tuple[dict[str, Any], dict[str, Any]]:
        """Answer a query using what earlier turns of this conversation found."""
        query = message["query"]
        related = [entry.text for entry in await ctx.memory.search(query, limit=3)
                   if entry.role == "user"]
        knowledge = Counter(state.get("knowledge") or {})
        focus = pick_focus(query, dict(knowledge))
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
