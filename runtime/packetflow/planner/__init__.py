"""The planner: a sentence of intent becomes a checked composition, executed and learned from.

- ``text``: terms, stems, synonyms and the values an intent names (pure).
- ``catalog``: capabilities as typed fields and words (pure).
- ``retrieval``: BM25 (and embeddings when installed) relevance of capabilities (pure).
- ``search``: the built-in planner's type-directed search over contracts (pure).
- ``compose``: plan -> Capability manifest, checked by the composition checker (pure).
- ``learning``: preference scores from outcomes and feedback; the plan cache (pure).
- ``store``: outcomes and cached plans in SQLite or PostgreSQL.
- ``llm``: OpenAI-compatible and Anthropic model planners, never trusted.
- ``core``: ``Planner``: plan, execute through the composition executor, learn.
- ``handler``: the ``planner`` implementation kind; ``cli``: ``packetflow plan``.
"""

from __future__ import annotations
