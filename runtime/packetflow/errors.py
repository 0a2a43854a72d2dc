"""Domain errors of the capability runtime, independent of any transport.

Each transport (gRPC now, MCP later) maps these to its own status codes in one place.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    """One field that broke a contract: ``field`` is a dotted path such as ``input.a``."""

    field: str
    description: str

    def __str__(self) -> str:
        return f"{self.field}: {self.description}"


class PacketFlowError(Exception):
    """Base of every error the runtime reports to a caller."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(PacketFlowError):
    """The call's input broke the capability's ``requires`` contract or was not JSON."""

    def __init__(self, violations: list[FieldViolation]) -> None:
        super().__init__("; ".join(str(v) for v in violations))
        self.violations = violations


class CapabilityNotFound(PacketFlowError):
    """No capability of that name is served here."""

    def __init__(self, name: str) -> None:
        super().__init__(f"capability {name!r} is not served here")
        self.name = name


class Overloaded(PacketFlowError):
    """The capability is already running its ``concurrency`` calls."""


class PayloadTooLarge(PacketFlowError):
    """The encoded input is larger than the runtime's payload limit."""


class DeadlineExceeded(PacketFlowError):
    """The call's deadline (caller's or ``timeoutSeconds``) passed; the handler was cancelled."""


class ContractViolation(PacketFlowError):
    """The handler returned output that breaks the capability's ``provides`` contract."""

    def __init__(self, capability: str, violations: list[FieldViolation]) -> None:
        super().__init__(
            f"capability {capability!r} broke its provides contract: "
            + "; ".join(str(v) for v in violations)
        )
        self.violations = violations


class HandlerFailed(PacketFlowError):
    """The handler raised; details stay in the server log, never in the reply."""


class Unavailable(PacketFlowError):
    """Something the capability depends on cannot be reached; retrying later may work."""


class NotServable(PacketFlowError):
    """The capability cannot run in this runtime (e.g. an ``image`` capability in local mode)."""


class Unauthenticated(PacketFlowError):
    """The caller's certificate did not authenticate it (federation)."""


class PermissionDenied(PacketFlowError):
    """The caller is known but may not make this call: not exported to it, or below the
    trust threshold (federation)."""


class Code(enum.StrEnum):
    """Canonical status codes (gRPC's names), used by every transport and by metrics."""

    OK = "OK"
    CANCELLED = "CANCELLED"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    NOT_FOUND = "NOT_FOUND"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    INTERNAL = "INTERNAL"
    UNAVAILABLE = "UNAVAILABLE"


# The one place where domain errors meet status codes; transports translate Code further.
_CODES: dict[type[PacketFlowError], Code] = {
    InvalidInput: Code.INVALID_ARGUMENT,
    CapabilityNotFound: Code.NOT_FOUND,
    Overloaded: Code.RESOURCE_EXHAUSTED,
    PayloadTooLarge: Code.RESOURCE_EXHAUSTED,
    DeadlineExceeded: Code.DEADLINE_EXCEEDED,
    ContractViolation: Code.INTERNAL,
    HandlerFailed: Code.INTERNAL,
    Unavailable: Code.UNAVAILABLE,
    NotServable: Code.FAILED_PRECONDITION,
    PermissionDenied: Code.PERMISSION_DENIED,
    Unauthenticated: Code.UNAUTHENTICATED,
}


def code_of(error: PacketFlowError) -> Code:
    """The status code a domain error is reported with."""
    for kind in type(error).__mro__:
        if kind in _CODES:
            return _CODES[kind]
    return Code.INTERNAL
