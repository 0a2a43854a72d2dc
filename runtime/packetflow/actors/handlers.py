"""Actor handlers from a manifest: a class (one instance per active actor) or module functions.

Handler methods may be sync or async; sync ones run on a worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from packetflow.manifests import ManifestError
from packetflow.spec import Actor, ActorSpec

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
