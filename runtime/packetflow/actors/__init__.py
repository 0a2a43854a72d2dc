"""Stateful actors: durable state, conversation memory, timers, reminders and placement."""

from __future__ import annotations

from packetflow.actors.active import SendResult
from packetflow.actors.context import ActorContext
from packetflow.actors.runtime import ActorSystem, ActorType
from packetflow.actors.store import MemoryEntry, Reminder

__all__ = ["ActorContext", "ActorSystem", "ActorType", "MemoryEntry", "Reminder", "SendResult"]
