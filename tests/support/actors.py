"""Actor test helpers: manifests for the handlers in ``tests.support.actor_handlers`` and an
injectable clock (the ``systems`` fixture is in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from packetflow.actors import ActorSystem
from packetflow.spec import Actor


def handler_actor(name: str, cls: str, intent: str = "A test actor", **spec: Any) -> Actor:
    """An Actor manifest for the handler class ``cls`` of ``tests.support.actor_handlers``."""
    fields = {"intent": intent,
              "implementation": {"python": {"module": "tests.support.actor_handlers",
                                            "class": cls}}, **spec}
    return Actor.model_validate({"apiVersion": "packetflow.io/v1alpha1", "kind": "Actor",
                                 "metadata": {"name": name}, "spec": fields})


class FakeClock:
    """An injectable wall clock: tests move time instead of waiting."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


SystemFactory = Callable[..., ActorSystem]
