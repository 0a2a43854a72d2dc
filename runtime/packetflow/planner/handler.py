"""The ``planner`` implementation kind: a Capability that turns ``intent`` (+ ``input``) into
``plan`` and ``results`` (the seed's ``natural_language_executor``).

Plans are made over the capabilities served beside it (``capabilities`` narrows them), run
through the composition executor with the caller's deadline and trace id, and learned from
through the runtime's planning services (outcomes, cache, feedback), when it has them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from packetflow.composition.executor import Invoke, Remote
from packetflow.composition.metrics import StepMetrics
from packetflow.context import CallContext
from packetflow.feedback import FeedbackStore
from packetflow.planner.core import Planner, PlanRequest
from packetflow.planner.llm import ChatModel, model_from_settings
from packetflow.planner.settings import PlannerSettings
from packetflow.planner.store import PlannerStore, open_planner_store
from packetflow.spec import Capability
from packetflow.validation import ImplementationError

PATH = "spec.implementation.planner"
PLANNER_NAME = "planner"  # what feedback on a Plan/PlanAndExecute trace is recorded against
OUTPUTS = ("plan", "results", "explanation", "executed", "blocked", "traceId")


@dataclass
class PlanningServices:
    """What every planner in a runtime shares: settings, the store and the feedback store."""

    settings: PlannerSettings = field(default_factory=PlannerSettings)
    store: PlannerStore | None = None
    feedback: FeedbackStore | None = None
    registry: CollectorRegistry | None = None

    async def aclose(self) -> None:
        """Close the planner store (the feedback store belongs to the feedback service)."""
        if self.store is not None:
            await self.store.aclose()


def check_contract(capability: Capability) -> None:
    """A planner requires ``intent`` (and may require ``input``) and provides ``plan`` and
    ``results`` (and may provide the other OUTPUTS); ImplementationError otherwise."""
    spec = capability.spec
    requires, provides = spec.requires or {}, spec.provides or {}
    if "intent" not in requires or set(requires) - {"intent", "input"}:
        raise ImplementationError("spec.requires", "a planner requires intent (a string) and "
                                  f"optionally input (an object); got {sorted(requires)}")
    if not {"plan", "results"} <= set(provides) or set(provides) - set(OUTPUTS):
        raise ImplementationError("spec.provides", "a planner provides plan and results "
                                  f"(optionally {', '.join(OUTPUTS[2:])}); got "
                                  f"{sorted(provides)}")


class PlannerHandler:
    """Plans and runs one call's intent."""

    def __init__(self, capability: Capability, invoke: Invoke, remote: Remote | None,
                 step_metrics: StepMetrics | None,
                 catalog: Callable[[], Iterable[Capability]],
                 services: Callable[[], PlanningServices | None]) -> None:
        check_contract(capability)
        impl = capability.spec.implementation.planner
        assert impl is not None
        self.impl = impl
        self.capability = capability
        self.invoke, self.remote, self.step_metrics = invoke, remote, step_metrics
        self.catalog = catalog
        self.services = services
        self.api_key: str | None = None
        if impl.model is not None and impl.model.api_key_from is not None:
            try:
                self.api_key = impl.model.api_key_from.resolve(os.environ)
            except KeyError as exc:
                raise ImplementationError(f"{PATH}.model.apiKeyFrom", str(exc.args[0])) \
                    from None
        self._planner: Planner | None = None
        self._model: ChatModel | None = None

    def planner(self) -> Planner:
        """The planner, made on first use (the runtime's services exist by then)."""
        if self._planner is None:
            services = self.services() or PlanningServices()
            overrides: dict[str, Any] = {}
            if self.impl.max_steps is not None:
                overrides["max_steps"] = self.impl.max_steps
            model = self.impl.model
            if model is not None:
                overrides.update(provider=model.provider, model=model.model,
                                 base_url=model.base_url)
                if self.api_key is not None:
                    overrides["api_key"] = SecretStr(self.api_key)
            settings = services.settings.model_copy(update=overrides)
            self._model = model_from_settings(settings, services.registry)
            self._planner = Planner(
                self.catalog, self.invoke, self.remote, settings=settings,
                store=services.store, feedback=services.feedback, model=self._model,
                registry=services.registry, step_metrics=self.step_metrics,
                allowed=self.impl.capabilities, exclude=[self.capability.name])
        return self._planner

    async def __call__(self, value: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        planner = self.planner()
        data = value.get("input", {})
        request = PlanRequest(str(value.get("intent", "")), data,
                              allow_effects=self.impl.allow_effects)
        result = await planner.plan(request)
        if self.impl.execute:
            await planner.execute(result, data, ctx)
            if result.error is not None:
                raise result.error  # the engine reports it; the trace is on ctx
        full = result.as_dict()
        full.setdefault("results", None)
        full.setdefault("blocked", "")
        full.setdefault("traceId", ctx.trace_id)
        wanted = self.capability.spec.provides or {}
        return {key: full.get(key) for key in OUTPUTS if key in wanted}

    async def aclose(self) -> None:
        """Close the model's connections."""
        if self._model is not None:
            await self._model.aclose()


async def open_planning(state_dir: Path, feedback: FeedbackStore | None,
                        registry: CollectorRegistry | None,
                        settings: PlannerSettings | None = None) -> PlanningServices:
    """The runtime's planning services: settings from ``PACKETFLOW_PLANNER_*``, the planner
    store (PostgreSQL with ``PACKETFLOW_PLANNER_STORE_DSN``, else SQLite under the state
    dir) and the runtime's feedback store."""
    settings = settings or PlannerSettings()
    store = await open_planner_store(state_dir, settings.store_dsn)
    return PlanningServices(settings, store, feedback, registry)


def runtime_planner(services: PlanningServices, catalog: Callable[[], Iterable[Capability]],
                    invoke: Invoke, remote: Remote | None,
                    step_metrics: StepMetrics | None) -> Planner:
    """The planner behind ``Plan``/``PlanAndExecute`` and the MCP tools: every capability
    served here, the configured model (if any)."""
    return Planner(catalog, invoke, remote, settings=services.settings, store=services.store,
                   feedback=services.feedback,
                   model=model_from_settings(services.settings, services.registry),
                   registry=services.registry, step_metrics=step_metrics)
