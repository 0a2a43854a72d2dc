"""The customer-support actor, as module-level handlers (no class): deterministic logic.

It classifies each message (complaint, question, request, thanks), answers with a strategy to
match, recalls similar earlier messages from memory, and follows up when the customer goes
quiet with an issue still open (``on_idle``).
"""

from __future__ import annotations

from typing import Any

from packetflow.actors import ActorContext

KEYWORDS = {
    "complaint": ("broken", "not working", "angry", "refund", "terrible", "doesn't work",
                  "failed", "wrong"),
    "request": ("please", "can you", "could you", "i want", "i need", "cancel", "change"),
    "thanks": ("thanks", "thank you", "resolved", "works now", "fixed"),
}
STRATEGY = {"complaint": "empathetic_resolution", "question": "informative_answer",
            "request": "action_oriented", "thanks": "close"}


def classify(text: str) -> str:
    """The message's intent from keywords; a question mark or nothing known: a question."""
    lowered = text.lower()
    for intent in ("thanks", "complaint", "request"):
        if any(word in lowered for word in KEYWORDS[intent]):
            return intent
    return "question"


def on_start(ctx: ActorContext) -> dict[str, Any]:
    """A new conversation starts with an empty case file for the customer."""
    return {"customer": ctx.actor_id, "current_issue": None, "resolution_steps": [],
            "resolved": False, "messages": 0}


async def on_message(message: dict[str, Any], state: dict[str, Any],
                     ctx: ActorContext) -> tuple[dict[str, Any], dict[str, Any]]:
    """Answer one customer message and update the case."""
    text = message["message"]
    intent = classify(text)
    similar = [e.text for e in await ctx.memory.search(text, limit=2) if e.role == "customer"]
    ctx.memory.append(text, role="customer", data={"intent": intent})
    steps = list(state["resolution_steps"])
    issue = state["current_issue"]
    if intent == "complaint":
        issue = text
        steps.append("investigate: " + text)
        response = "I'm sorry about that. I've opened a case and will look into it right away."
    elif intent == "request":
        steps.append("do: " + text)
        response = "Sure, I've noted your request and will take care of it."
    elif intent == "thanks":
        response = "Glad it's sorted! I've closed the case."
    else:
        response = "Good question. " + (f"Earlier you mentioned: {similar[0]}"
                                        if similar else "Let me find that out for you.")
    resolved = intent == "thanks" or (state["resolved"] and intent != "complaint")
    ctx.memory.append(response, role="agent")
    new_state = {**state, "current_issue": None if resolved else issue,
                 "resolution_steps": [] if resolved else steps, "resolved": resolved,
                 "messages": state["messages"] + 1}
    summary = (f"{new_state['messages']} messages; "
               + ("resolved" if resolved else f"open issue: {new_state['current_issue']}"))
    return {"response": response, "action_items": new_state["resolution_steps"],
            "conversation_summary": summary}, new_state


def on_idle(state: dict[str, Any], ctx: ActorContext) -> dict[str, Any] | None:
    """Proactive follow-up when the customer went quiet with an issue still open."""
    if state["current_issue"] and not state["resolved"]:
        return {"text": f"Just checking in about: {state['current_issue']}. Is it still "
                        "happening?"}
    return None


def prune_resolved(state: dict[str, Any], ctx: ActorContext) -> dict[str, Any] | None:
    """Scheduled cleanup: a resolved case keeps no resolution steps."""
    if state["resolved"] and state["resolution_steps"]:
        return {**state, "resolution_steps": []}
    return None
