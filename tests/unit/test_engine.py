"""The engine without a transport: reload keeps unchanged handlers and retires the rest."""

from __future__ import annotations

import asyncio

from packetflow.builtins.http import HttpHandler
from packetflow.context import CallContext
from packetflow.engine import Engine
from packetflow.manifests import load_text
from packetflow.spec import Capability
from tests.conftest import eventually
from tests.support import handlers

HTTP = """
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {{name: fetch}}
spec:
  intent: Fetch
  implementation: {{builtin: {{name: http, config: {{url: "{url}", allowedHosts: [127.0.0.1]}}}}}}
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {{name: hold}}
spec:
  intent: Hold
  requires: [gate]
  implementation: {{python: {{module: tests.support.handlers, function: hold}}}}
"""


def caps(url: str) -> list[Capability]:
    loaded = load_text(HTTP.format(url=url))
    assert not loaded.errors
    return loaded.capabilities


async def test_reload_keeps_unchanged_and_closes_changed_handlers() -> None:
    engine = Engine(caps("http://127.0.0.1:1/a"))
    fetch, hold = engine.get("fetch"), engine.get("hold")
    assert isinstance(fetch.handler, HttpHandler)
    fetch.handler._client_for_loop()  # as a first call would
    errors = engine.replace(caps("http://127.0.0.1:1/b"))
    assert errors == []
    assert engine.get("hold") is hold  # unchanged: same entry, same handler
    assert engine.get("fetch") is not fetch and fetch.retired

    await eventually(lambda: fetch.handler._client is None,  # type: ignore[attr-defined]
                     what="the retired handler's client closed")


async def test_calls_in_flight_finish_on_the_retired_entry() -> None:
    engine = Engine(caps("http://127.0.0.1:1/a"))
    handlers.GATES["reload"] = asyncio.Event()
    call = asyncio.create_task(
        engine.invoke("hold", {"gate": "reload"}, CallContext("hold", "reload")))
    old = engine.get("hold")
    await eventually(lambda: old.in_flight == 1, what="the call running")
    engine.replace([])
    handlers.GATES["reload"].set()
    assert await call == {"gate": "reload"}
    assert old.in_flight == 0 and old.retired
