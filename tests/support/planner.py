"""The planner's test registry (the examples and the evaluation toolbox) and planners over a
real engine with real SQLite stores."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from packetflow.engine import Engine
from packetflow.feedback import FeedbackService, SqliteFeedbackStore
from packetflow.manifests import load_paths
from packetflow.planner.core import Planner
from packetflow.planner.llm import ChatModel
from packetflow.planner.settings import PlannerSettings
from packetflow.planner.store import PlannerStore, sqlite_store
from packetflow.spec import Capability

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
TOOLBOX = ROOT / "bench" / "planner_eval" / "toolbox.yaml"


def registry() -> list[Capability]:
    """The examples (their python module importable) and the toolbox."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    loaded = load_paths([EXAMPLES, TOOLBOX])
    assert not loaded.errors, loaded.errors
    return loaded.capabilities


@dataclass
class Planning:
    """An engine, its feedback service and a planner with durable stores."""

    engine: Engine
    feedback: FeedbackService
    store: PlannerStore
    planner: Planner


@asynccontextmanager
async def planning(state: Path, *, model: ChatModel | None = None,
                   settings: PlannerSettings | None = None,
                   capabilities: list[Capability] | None = None) -> AsyncIterator[Planning]:
    """A planner over ``capabilities`` (default: the registry) in a real engine."""
    engine = Engine(registry() if capabilities is None else capabilities)
    assert not engine.load_errors, engine.load_errors
    feedback = FeedbackService(SqliteFeedbackStore(state / "feedback.db"),
                               engine.metrics.registry, engine.traces)
    store = sqlite_store(state / "planner.db")
    planner = Planner(engine.capabilities, engine.invoke,
                      settings=settings or PlannerSettings(embeddings=False), store=store,
                      feedback=feedback.store, model=model, registry=engine.metrics.registry,
                      step_metrics=engine.step_metrics)
    try:
        yield Planning(engine, feedback, store, planner)
    finally:
        await planner.aclose()
        await store.aclose()
        await feedback.aclose()
        await engine.aclose()
