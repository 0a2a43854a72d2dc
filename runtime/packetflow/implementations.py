"""Turn a capability's ``implementation`` into a handler the engine can run."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import typing
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import BaseModel, ValidationError

from packetflow.builtins import builtin_handler
from packetflow.composition.executor import Invoke, Remote, composition_handler
from packetflow.composition.metrics import StepMetrics
from packetflow.context import CallContext, Handler
from packetflow.errors import FieldViolation, InvalidInput, NotServable
from packetflow.spec import Capability, PythonImplementation
from packetflow.validation import ImplementationError


def build_handler(capability: Capability, invoke: Invoke | None = None,
                  remote: Remote | None = None, step_metrics: StepMetrics | None = None, *,
                  catalog: Callable[[], Iterable[Capability]] | None = None,
                  planning: Callable[[], Any] | None = None) -> Handler:
    """The handler for a capability, or ImplementationError naming the field that is wrong.

    Compositions call other capabilities through ``invoke`` (local) and ``remote``; a planner
    plans over ``catalog()`` and learns through ``planning()`` (the runtime's services).
    """
    impl = capability.spec.implementation
    if impl.planner is not None and invoke is not None and catalog is not None:
        from packetflow.planner.handler import PlannerHandler  # loads only when used

        return PlannerHandler(capability, invoke, remote, step_metrics, catalog,
                              planning or (lambda: None))
    if impl.python is not None:
        return python_handler(impl.python)
    if impl.builtin is not None:
        return builtin_handler(impl.builtin)
    if impl.mcp is not None:
        return mcp_handler(capability)
    if impl.federated is not None:
        # Imported here: the federation client loads only for manifests that use it.
        from packetflow.federation.imported import FederatedCapability

        return FederatedCapability(capability)
    if impl.image is not None:
        return _refuse(f"capability {capability.name!r} runs as image {impl.image.image!r}; "
                       "image capabilities run in their own pods under the operator, not locally")
    if impl.composition is not None and invoke is not None:
        return composition_handler(impl.composition, invoke, remote, name=capability.name,
                                   metrics=step_metrics)
    return _refuse(f"capability {capability.name!r} is a {impl.kind}, which needs an engine "
                   "to run its steps")


def mcp_handler(capability: Capability) -> Handler:
    """A remote MCP server's tool; headers are resolved now, so a missing secret is a load
    error naming the header, not a failure of the first call."""
    # Imported here: the MCP client stack loads only for manifests that use it.
    from packetflow.mcp.remote import RemoteMcpTool, resolve_headers

    impl = capability.spec.implementation.mcp
    assert impl is not None
    headers: dict[str, str] = {}
    for name, source in impl.headers_from.items():
        try:
            headers.update(resolve_headers({name: source}))
        except KeyError as exc:
            raise ImplementationError(f"spec.implementation.mcp.headersFrom.{name}",
                                      str(exc.args[0])) from None
    return RemoteMcpTool(impl.url, impl.tool, headers,
                         check_input=capability.spec.requires is None,
                         check_output=capability.spec.provides is None)


def _refuse(message: str) -> Handler:
    async def refuse(value: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        raise NotServable(message)

    return refuse


def python_handler(impl: PythonImplementation) -> Handler:
    """Import ``module:function`` and adapt it to the handler signature.

    The function receives the input fields as keyword arguments (or one pydantic model
    argument built from the input), plus ``ctx`` if it declares it. Sync functions run in a
    worker thread so they never block the event loop. A pydantic model result is dumped.
    """
    path = "spec.implementation.python"
    try:
        module = importlib.import_module(impl.module)
    except Exception as exc:  # any import-time failure is the manifest author's to see
        raise ImplementationError(f"{path}.module", f"cannot import {impl.module!r}: "
                                  f"{type(exc).__name__}: {exc}") from None
    function = getattr(module, impl.function, None)
    if not callable(function):
        raise ImplementationError(f"{path}.function",
                                  f"{impl.module!r} has no function {impl.function!r}")
    call = _argument_adapter(function)
    if inspect.iscoroutinefunction(function):
        async def run_async(value: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
            return _as_output(await call(value, ctx))

        return run_async

    async def run_sync(value: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        return _as_output(await asyncio.to_thread(call, value, ctx))

    return run_sync


def _argument_adapter(function: Callable[..., Any]) -> Callable[[dict[str, Any], CallContext], Any]:
    """Decide once how to pass input to the function: a model, or keyword arguments."""
    signature = inspect.signature(function)
    wants_ctx = "ctx" in signature.parameters
    others = [p for name, p in signature.parameters.items() if name != "ctx"]
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # unresolvable annotations: fall back to keyword arguments
        hints = {}
    if len(others) == 1 and isinstance(hints.get(others[0].name), type) and issubclass(
            hints[others[0].name], BaseModel):
        model: type[BaseModel] = hints[others[0].name]
        name = others[0].name

        def with_model(value: dict[str, Any], ctx: CallContext) -> Any:
            try:
                args = {name: model.model_validate(value)}
            except ValidationError as exc:
                raise InvalidInput([
                    FieldViolation(".".join(["input", *map(str, e["loc"])]), e["msg"])
                    for e in exc.errors()
                ]) from None
            return function(**args, ctx=ctx) if wants_ctx else function(**args)

        return with_model

    def with_keywords(value: dict[str, Any], ctx: CallContext) -> Any:
        return function(**value, ctx=ctx) if wants_ctx else function(**value)

    return with_keywords


def _as_output(result: Any) -> dict[str, Any]:
    """Pydantic models become plain JSON data; everything else goes to the contract check."""
    if isinstance(result, BaseModel):
        return result.model_dump(mode="json")
    return result  # type: ignore[no-any-return] # not necessarily a dict: the contract checks
