"""Fixtures: the Kubernetes emulator over HTTP and the real kopf operator running against it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from packetflow.operator.handlers import OperatorContext, OperatorThread
from packetflow.operator.metrics import OperatorMetrics
from packetflow.operator.settings import OperatorSettings
from tests.operator.kube_emulator import ClusterEmulator


async def wait_for(check: Callable[[], Any | Awaitable[Any]], timeout: float = 10.0,
                   what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy (returned) or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


class OperatorRunner:
    """Starts and stops the real operator (kopf.operator) in its own thread and loop."""

    def __init__(self, namespaces: list[str], **settings: Any) -> None:
        self.namespaces = namespaces
        self.settings = settings  # OperatorSettings overrides
        self.thread: OperatorThread | None = None

    @property
    def ctx(self) -> OperatorContext:
        assert self.thread is not None
        return self.thread.ctx

    async def start(self) -> OperatorContext:
        """Start an operator and wait until kopf reports it ready."""
        settings = OperatorSettings(**{"liveness_address": None,
                                       "operator_metrics_address": None,
                                       "retry_delay_seconds": 0.2, **self.settings})
        ctx = OperatorContext.create(settings, OperatorMetrics(registry=CollectorRegistry()))
        self.thread = OperatorThread(ctx, namespaces=self.namespaces)
        await asyncio.to_thread(self.thread.start)
        return ctx

    async def stop(self) -> None:
        """Ask kopf to stop and wait for it to finish."""
        if self.thread is not None:
            await asyncio.to_thread(self.thread.stop)
            self.thread = None


@pytest.fixture
async def operator_runner(cluster: ClusterEmulator) -> AsyncIterator[OperatorRunner]:
    """A running operator watching the ``default`` namespace, stopped after the test."""
    runner = OperatorRunner(["default"])
    await runner.start()
    try:
        yield runner
    finally:
        await runner.stop()
