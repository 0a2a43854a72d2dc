"""What a turn runs on: an actor in memory, the turn itself and what it will commit.

Plain data shared by the runtime (which runs turns) and the handler context (which records a
turn's effects), so neither has to import the other.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from typing import Any

from packetflow.actors.store import MemoryEntry, Reminder
from packetflow.errors import FieldViolation, InvalidInput

ACTOR_ID_RE = re.compile(r"^[^\x00-\x1f]{1,256}$")


def check_actor_id(actor_id: str) -> str:
    """Actor ids are 1-256 printable characters."""
    if not isinstance(actor_id, str) or not ACTOR_ID_RE.match(actor_id):
        raise InvalidInput([FieldViolation("id", "must be 1-256 printable characters")])
    return actor_id


@dataclass
class TurnEffects:
    """What a turn will commit besides the state: memory appends and reminder changes."""

    appends: list[MemoryEntry] = field(default_factory=list)
    set_reminders: dict[str, Reminder] = field(default_factory=dict)
    delete_reminders: set[str] = field(default_factory=set)

    def copy(self) -> TurnEffects:
        """An independent copy: a turn that fails must not leave its changes in the original."""
        return TurnEffects(list(self.appends), dict(self.set_reminders),
                           set(self.delete_reminders))


@dataclass(frozen=True)
class SendResult:
    """A committed turn's reply and the state version it produced."""

    reply: dict[str, Any]
    version: int
    duplicate: bool = False


@dataclass(frozen=True)
class Turn:
    """What a turn handles: a message, a timer/reminder/schedule by name, or going idle."""

    kind: str  # message | trigger | idle
    message: dict[str, Any] | None = None
    message_id: str | None = None
    name: str = ""
    data: Any = None
    trigger: str = ""  # timer | reminder | schedule
    fired: tuple[str, float, float | None] | None = None
    trace_id: str = ""
    caller: str | None = None
    deadline: float | None = None  # event-loop time


@dataclass(eq=False)
class ActiveActor:
    """An actor in memory: its lease epoch, committed state and lock."""

    actor_id: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    activated: bool = False
    retired: bool = False
    epoch: int = 0
    state_json: bytes = b"{}"
    version: int = 0
    memory_seq: int = 0
    handler: Any = None
    start_effects: TurnEffects | None = None
    last_used: float = field(default_factory=time.monotonic)
    pending: int = 0
    idle_notified: bool = False
    timers: dict[str, asyncio.TimerHandle] = field(default_factory=dict)
