"""Actor errors, as subclasses of the runtime's domain errors so ``errors.code_of`` maps them."""

from __future__ import annotations

from packetflow.errors import (
    CapabilityNotFound,
    ContractViolation,
    FieldViolation,
    PacketFlowError,
    Unavailable,
)


class ActorTypeNotFound(CapabilityNotFound):
    """No actor type of that name is served here (NOT_FOUND)."""

    def __init__(self, name: str) -> None:
        PacketFlowError.__init__(self, f"actor type {name!r} is not served here")
        self.name = name


class ActorNotFound(CapabilityNotFound):
    """The actor has no stored state (NOT_FOUND)."""

    def __init__(self, actor_type: str, actor_id: str) -> None:
        PacketFlowError.__init__(self, f"actor {actor_type}/{actor_id} does not exist")
        self.name = actor_id


class FencedOut(Unavailable):
    """Another owner activated the actor since we did: our write is refused (UNAVAILABLE;
    the caller may retry and reach the new owner)."""

    def __init__(self, actor_type: str, actor_id: str, epoch: int) -> None:
        super().__init__(f"actor {actor_type}/{actor_id}: write refused, epoch {epoch} is "
                         "stale (the actor is active elsewhere)")
        self.epoch = epoch


class StoreUnavailable(Unavailable):
    """The actor store cannot be reached (UNAVAILABLE)."""


class StoreRefused(ContractViolation):
    """The actor store refused what a turn wrote (data it cannot hold): INTERNAL, the turn
    did not happen."""

    def __init__(self, actor_type: str, detail: str) -> None:
        PacketFlowError.__init__(self, f"actor store of {actor_type} refused the write: {detail}")
        self.violations = [FieldViolation("store", detail)]


class ReminderMoved(Unavailable):
    """The reminder slot a turn handled was already handled (by another member) or the
    reminder changed meanwhile: the turn is refused, nothing of it commits."""

    def __init__(self, actor_type: str, actor_id: str, name: str) -> None:
        super().__init__(f"actor {actor_type}/{actor_id}: reminder {name!r} was already "
                         "handled or changed")
