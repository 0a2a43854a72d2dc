"""User satisfaction with calls: ``Feedback`` (gRPC), ``packetflow feedback TRACE_ID --score``.

A score (0..1) is attached to a call's trace id and, when the caller does not say, to the
capability that served that trace here. Scores are stored durably (SQLite under the state
dir, or a shared PostgreSQL with ``PACKETFLOW_FEEDBACK_STORE_DSN``) and exported as the
histogram ``packetflow_feedback_score{capability}``: the routing controller weighs changes by
it, and the planner joins it with its plans' outcomes by trace id (:meth:`FeedbackStore.scores`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Histogram

from packetflow.databases import (
    PostgresDatabase,
    SqliteDatabase,
    open_shared_or_local,
)
from packetflow.errors import FieldViolation, InvalidInput

MAX_COMMENT = 1000
MAX_TRACE_ID = 128
SCORE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
RECENT_TRACES = 10_000
SQLITE_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS feedback (trace_id TEXT NOT NULL, capability TEXT NOT NULL, "
    "score REAL NOT NULL, comment TEXT NOT NULL, at REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS feedback_capability ON feedback (capability, at)",
    "CREATE INDEX IF NOT EXISTS feedback_trace ON feedback (trace_id)",
)
POSTGRES_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS pf_feedback (trace_id TEXT NOT NULL, capability TEXT NOT NULL,"
    " score DOUBLE PRECISION NOT NULL, comment TEXT NOT NULL, at DOUBLE PRECISION NOT NULL)",
    "CREATE INDEX IF NOT EXISTS pf_feedback_capability ON pf_feedback (capability, at)",
    "CREATE INDEX IF NOT EXISTS pf_feedback_trace ON pf_feedback (trace_id)",
)
SCORES_BATCH = 500  # trace ids per query (SQLite's variable limit is 999 on old builds)


@dataclass(frozen=True)
class FeedbackRecord:
    """One piece of feedback: which call (trace id), which capability, how good, when."""

    trace_id: str
    capability: str
    score: float
    comment: str
    at: float


class FeedbackStore(Protocol):
    """Where feedback is kept. Async: a durable store does I/O off the event loop."""

    async def add(self, record: FeedbackRecord) -> None:
        """Store one record."""

    async def summary(self, capability: str, since: float = 0.0) -> tuple[int, float]:
        """How many scores ``capability`` got since ``since`` and their mean (0 when none)."""

    async def scores(self, trace_ids: Sequence[str]) -> dict[str, float]:
        """The mean score of each of ``trace_ids`` that has feedback (the planner's join)."""

    async def aclose(self) -> None:
        """Release what the store holds."""


def _means(rows: Iterable[tuple[Any, Any]]) -> dict[str, float]:
    return {str(trace_id): float(mean) for trace_id, mean in rows}


class MemoryFeedbackStore:
    """Feedback in memory (when the state dir cannot be written): lost on restart."""

    def __init__(self) -> None:
        self.records: list[FeedbackRecord] = []

    async def add(self, record: FeedbackRecord) -> None:
        """Keep one record."""
        self.records.append(record)

    async def summary(self, capability: str, since: float = 0.0) -> tuple[int, float]:
        """Count and mean score of ``capability`` since ``since``."""
        scores = [r.score for r in self.records if r.capability == capability and r.at >= since]
        return len(scores), (sum(scores) / len(scores) if scores else 0.0)

    async def scores(self, trace_ids: Sequence[str]) -> dict[str, float]:
        """Mean score per trace id that has feedback."""
        wanted = set(trace_ids)
        found: dict[str, list[float]] = {}
        for record in self.records:
            if record.trace_id in wanted:
                found.setdefault(record.trace_id, []).append(record.score)
        return _means((t, sum(s) / len(s)) for t, s in found.items())

    async def aclose(self) -> None:
        """Nothing to release."""


class SqliteFeedbackStore:
    """Feedback in SQLite (WAL), one worker thread: the embedded default."""

    def __init__(self, path: Path | str) -> None:
        self.database = SqliteDatabase(path, SQLITE_SCHEMA, "feedback")
        self._run = self.database.run

    async def add(self, record: FeedbackRecord) -> None:
        """Store one record (committed when this returns)."""
        await self._run("INSERT INTO feedback VALUES (?, ?, ?, ?, ?)", record.trace_id,
                        record.capability, record.score, record.comment, record.at)

    async def summary(self, capability: str, since: float = 0.0) -> tuple[int, float]:
        """Count and mean score of ``capability`` since ``since``."""
        ((count, mean),) = await self._run(
            "SELECT count(*), coalesce(avg(score), 0) FROM feedback "
            "WHERE capability = ? AND at >= ?", capability, since)
        return int(count), float(mean)

    async def scores(self, trace_ids: Sequence[str]) -> dict[str, float]:
        """Mean score per trace id that has feedback."""
        found: dict[str, float] = {}
        for start in range(0, len(trace_ids), SCORES_BATCH):
            batch = list(trace_ids[start:start + SCORES_BATCH])
            found.update(_means(await self._run(
                "SELECT trace_id, avg(score) FROM feedback WHERE trace_id IN "
                f"({', '.join('?' for _ in batch)}) GROUP BY trace_id", *batch)))
        return found

    async def aclose(self) -> None:
        """Finish pending statements, then close the database."""
        await self.database.aclose()


class PostgresFeedbackStore:
    """Feedback in a PostgreSQL database every replica shares; open with :meth:`connect`."""

    def __init__(self, database: PostgresDatabase) -> None:
        self.database = database
        self._run = database.run

    @classmethod
    async def connect(cls, dsn: str) -> PostgresFeedbackStore:
        """Connect and create the table if needed."""
        return cls(await PostgresDatabase.connect(dsn, POSTGRES_SCHEMA, "the feedback store"))

    async def add(self, record: FeedbackRecord) -> None:
        """Store one record (committed when this returns)."""
        await self._run("INSERT INTO pf_feedback VALUES (?, ?, ?, ?, ?)", record.trace_id,
                        record.capability, record.score, record.comment, record.at)

    async def summary(self, capability: str, since: float = 0.0) -> tuple[int, float]:
        """Count and mean score of ``capability`` since ``since``."""
        ((count, mean),) = await self._run(
            "SELECT count(*), coalesce(avg(score), 0) FROM pf_feedback "
            "WHERE capability = ? AND at >= ?", capability, since)
        return int(count), float(mean)

    async def scores(self, trace_ids: Sequence[str]) -> dict[str, float]:
        """Mean score per trace id that has feedback."""
        return _means(await self._run(
            "SELECT trace_id, avg(score) FROM pf_feedback WHERE trace_id = ANY(?) "
            "GROUP BY trace_id", list(trace_ids)))

    async def aclose(self) -> None:
        """Close the connection."""
        await self.database.aclose()


class RecentTraces:
    """Which capability served each of the last ``capacity`` trace ids (wire calls)."""

    def __init__(self, capacity: int = RECENT_TRACES) -> None:
        self.capacity = capacity
        self._served: OrderedDict[str, str] = OrderedDict()

    def served(self, trace_id: str, capability: str) -> None:
        """Remember that ``capability`` served ``trace_id``."""
        self._served[trace_id] = capability
        if len(self._served) > self.capacity:
            self._served.popitem(last=False)

    def capability(self, trace_id: str) -> str:
        """The capability that served ``trace_id`` here, or "" when it was not seen."""
        return self._served.get(trace_id, "")


class FeedbackService:
    """Checks feedback, fills in the capability, stores it and counts it in the metric."""

    def __init__(self, store: FeedbackStore, registry: CollectorRegistry,
                 traces: RecentTraces | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.traces = traces or RecentTraces()
        self.clock = clock
        self.scores = Histogram("packetflow_feedback_score",
                                "User satisfaction scores (0..1) of calls, per capability.",
                                ["capability"], buckets=SCORE_BUCKETS, registry=registry)

    async def record(self, trace_id: str, score: float, capability: str = "",
                     comment: str = "") -> FeedbackRecord:
        """Validate and store one piece of feedback; bad fields raise InvalidInput."""
        problems = []
        if not trace_id or len(trace_id) > MAX_TRACE_ID:
            problems.append(FieldViolation(
                "trace_id", f"must be 1..{MAX_TRACE_ID} characters"))
        if not 0.0 <= score <= 1.0:  # NaN fails this too
            problems.append(FieldViolation("score", f"must be between 0 and 1, got {score}"))
        if len(comment) > MAX_COMMENT:
            problems.append(FieldViolation("comment", f"at most {MAX_COMMENT} characters"))
        if problems:
            raise InvalidInput(problems)
        record = FeedbackRecord(trace_id, capability or self.traces.capability(trace_id),
                                score, comment, self.clock())
        await self.store.add(record)
        self.scores.labels(record.capability).observe(score)
        return record

    async def aclose(self) -> None:
        """Close the store."""
        await self.store.aclose()


async def open_store(state_dir: Path, dsn: str | None) -> FeedbackStore:
    """The shared PostgreSQL when configured, else SQLite under the state dir."""
    return await open_shared_or_local(
        "feedback store", "PACKETFLOW_FEEDBACK_STORE_DSN", dsn, PostgresFeedbackStore.connect,
        state_dir, lambda directory: SqliteFeedbackStore(directory / "feedback.db"),
        MemoryFeedbackStore)


# ------------------------------------------------------------------------------- CLI


def cmd_feedback(args: argparse.Namespace) -> int:
    """Send one piece of feedback to a runtime; prints the capability it was recorded for."""
    from packetflow.client import CallError, RuntimeClient  # the CLI's own import, lazily

    async def send() -> str:
        async with RuntimeClient(args.address) as client:
            return await client.feedback(args.trace_id, args.score,
                                         capability=args.capability, comment=args.comment)

    try:
        capability = asyncio.run(send())
    except CallError as exc:
        print(f"error: {exc}", file=sys.stderr)
        for violation in exc.violations:
            print(f"  {violation}", file=sys.stderr)
        return 1
    print(f"recorded {args.score:g} for {args.trace_id}"
          + (f" ({capability})" if capability else " (capability unknown)"))
    return 0


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``feedback`` (entry point group ``packetflow.commands``)."""
    parser = sub.add_parser("feedback", help="record user satisfaction with a call",
                            description="Attach a score (0..1) to a call's trace id; the "
                                        "routing controller and the planner read it.")
    parser.add_argument("trace_id", metavar="TRACE_ID", help="the call's trace id")
    parser.add_argument("--score", type=float, required=True, help="0 (bad) .. 1 (good)")
    parser.add_argument("--capability", default="",
                        help="the capability that served it (default: the runtime looks "
                             "the trace id up among its recent calls)")
    parser.add_argument("--comment", default="", help="free text (stored, not a metric)")
    parser.add_argument("--address",
                        default=os.environ.get("PACKETFLOW_ADDRESS", "127.0.0.1:50051"),
                        help="runtime gRPC address (default: $PACKETFLOW_ADDRESS or "
                             "127.0.0.1:50051)")
    parser.set_defaults(func=cmd_feedback)
