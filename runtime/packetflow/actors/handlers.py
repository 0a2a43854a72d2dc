"""Actor handlers from a manifest: a class (one instance per active actor) or module functions.

Handler methods may be sync or async; sync ones run on a worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import orjson

from packetflow.actors.active import ActiveActor, Turn
from packetflow.actors.context import ActorContext
from packetflow.contracts import CompiledContract
from packetflow.errors import ContractViolation, FieldViolation
from packetflow.manifests import ManifestError
from packetflow.spec import Actor, ActorSpec

log = logging.getLogger("packetflow.actors")

HANDLER_NAMES = ("on_start", "on_message", "on_idle")


class HandlerLoadError(Exception):
    """The implementation cannot be loaded; ``path`` names the manifest field."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


@dataclass(frozen=True)
class HandlerSource:
    """Makes the handler object of one actor: a fresh class instance, or the module itself."""

    make: Callable[[], Any]
    described: str


def load_handlers(spec: ActorSpec) -> HandlerSource:
    """Import the implementation and check that every handler the manifest names exists."""
    impl = spec.implementation.python
    where = "spec.implementation.python"
    try:
        module = importlib.import_module(impl.module)
    except Exception as exc:  # ImportError, or the module raised while importing
        raise HandlerLoadError(f"{where}.module",
                               f"cannot import {impl.module!r}: {exc}") from None
    target: Any = module
    if impl.class_ is not None:
        target = getattr(module, impl.class_, None)
        if not inspect.isclass(target):
            raise HandlerLoadError(f"{where}.class",
                                   f"{impl.module} has no class {impl.class_!r}")
    if not callable(getattr(target, "on_message", None)):
        raise HandlerLoadError(where, f"{impl.module}{'.' + impl.class_ if impl.class_ else ''}"
                                      " has no on_message handler")
    for index, schedule in enumerate(spec.schedules):
        if not callable(getattr(target, schedule.name, None)):
            raise HandlerLoadError(f"spec.schedules[{index}].name",
                                   f"no handler named {schedule.name!r}")
    if isinstance(target, ModuleType):
        return HandlerSource(lambda: module, impl.module)
    cls = target
    return HandlerSource(cls, f"{impl.module}.{impl.class_}")


def handler_errors(actors: Iterable[Actor]) -> list[ManifestError]:
    """Load errors of the actor types' handlers (``packetflow validate``), field named."""
    errors: list[ManifestError] = []
    for actor in actors:
        try:
            load_handlers(actor.spec)
        except HandlerLoadError as exc:
            errors.append(ManifestError(f"actor {actor.name}", exc.path, exc.message))
    return errors


async def call_handler(function: Callable[..., Any], *args: Any) -> Any:
    """Await an async handler; run a sync one on a worker thread so the loop keeps serving."""
    if inspect.iscoroutinefunction(function):
        return await function(*args)
    result = await asyncio.to_thread(function, *args)
    if inspect.isawaitable(result):
        return await result
    return result


async def handle_turn(type_name: str, provides: CompiledContract, actor: ActiveActor,
                      turn: Turn, ctx: ActorContext, state: dict[str, Any]
                      ) -> tuple[dict[str, Any], Any, dict[str, Any] | None]:
    """Run the handler a turn calls for; returns (reply, new state, follow-up message).
    A message's reply is checked against ``provides``; what a handler returns in the wrong
    shape is a ContractViolation naming the handler."""
    handler = actor.handler
    if turn.kind == "message":
        outcome = await call_handler(handler.on_message, turn.message, state, ctx)
        if not (isinstance(outcome, tuple) and len(outcome) == 2):
            raise ContractViolation(type_name, [FieldViolation(
                "on_message", "must return (reply, new_state)")])
        reply, new_state = outcome
        reply, violations = provides.check(reply, "reply")
        if violations:
            raise ContractViolation(type_name, violations)
        return reply, new_state, None
    if turn.kind == "idle":
        followup = await call_handler(handler.on_idle, state, ctx)
        if isinstance(followup, str):
            followup = {"text": followup}
        if followup is not None and not isinstance(followup, dict):
            raise ContractViolation(type_name, [FieldViolation(
                "on_idle", "must return a message object, a string or None")])
        if followup is not None:
            text = followup.get("text")
            ctx.memory.append(text if isinstance(text, str) else orjson.dumps(
                followup).decode(), role="assistant", data=followup)
        return {}, state, followup
    fallback = "on_timer" if turn.trigger == "timer" else "on_reminder"
    function = getattr(handler, turn.name, None)
    if not callable(function):
        function = getattr(handler, fallback, None)
    if not callable(function):
        log.warning("actor %s/%s: no handler for %s %r", type_name, actor.actor_id,
                    turn.trigger, turn.name)
        return {}, state, None
    new_state = await call_handler(function, state, ctx)
    return {}, state if new_state is None else new_state, None
