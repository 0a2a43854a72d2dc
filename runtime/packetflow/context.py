"""The per-call context a handler receives, and the handler signature itself."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from packetflow.identity.workload import Principal

ProgressSink = Callable[[str, float], None]

# gRPC metadata keys that carry the context across processes.
TRACE_ID_KEY = "packetflow-trace-id"
CALLER_KEY = "packetflow-caller"
# A caller sets WANT_TRACE_KEY to "1" to get a composition's execution trace (JSON) back in
# the trailing metadata EXECUTION_TRACE_KEY (binary, so no ASCII limit applies).
WANT_TRACE_KEY = "packetflow-want-trace"
EXECUTION_TRACE_KEY = "packetflow-execution-trace-bin"
# W3C trace context: the trace id when no packetflow-trace-id is given.
TRACEPARENT_KEY = "traceparent"
# A caller's promise that a repeated call with this key is applied once (or is harmless), so
# the gateway may retry a capability that declares effects; handlers see ctx.idempotency_key.
IDEMPOTENCY_KEY = "packetflow-idempotency-key"


def traceparent_trace_id(value: str) -> str | None:
    """The trace id of a W3C ``traceparent`` value (version-traceid-spanid-flags)."""
    parts = value.split("-")
    return parts[1] if len(parts) == 4 else None


def _ignore_progress(message: str, fraction: float) -> None:
    """Progress sink for unary calls: nobody is listening."""


@dataclass
class CallContext:
    """What a handler knows about the call: who, which trace, until when, what it may do."""

    capability: str
    trace_id: str
    caller: str | None = None
    deadline: float | None = None  # event-loop time (``loop.time()``), set by the engine
    effects: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)
    idempotency_key: str | None = None
    progress_sink: ProgressSink = _ignore_progress
    # The proven caller of a call that came over the wire with zero trust on; None for calls
    # made inside the process (composition steps), which the edge already authorized.
    principal: Principal | None = None

    def time_remaining(self) -> float | None:
        """Seconds left before the deadline, or ``None`` when the call has none."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - asyncio.get_running_loop().time())

    def progress(self, message: str, fraction: float = -1.0) -> None:
        """Report progress; streaming callers see it as an event, unary callers do not."""
        self.progress_sink(message, fraction)


Handler = Callable[[dict[str, Any], CallContext], Awaitable[dict[str, Any]]]
"""An implementation as the engine runs it: validated input in, output object out."""

H = TypeVar("H", bound=Handler)

_INLINE_ATTRIBUTE = "packetflow_never_suspends"


def never_suspends(handler: H) -> H:
    """Mark a handler whose coroutine never awaits anything.

    Such a handler finishes in the step that starts it, so a deadline could never interrupt
    it: the engine skips arming a timeout for it (several microseconds a call).
    """
    setattr(handler, _INLINE_ATTRIBUTE, True)
    return handler


def suspends(handler: Handler) -> bool:
    """Whether ``handler`` may await, and so needs a deadline armed around it."""
    return not getattr(handler, _INLINE_ATTRIBUTE, False)
