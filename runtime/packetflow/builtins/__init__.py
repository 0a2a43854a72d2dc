"""Capabilities that ship with PacketFlow: ``echo``, ``transform``, ``template``, ``http``.

A manifest alone is then a useful capability. Configs were checked when the manifest loaded
(``packetflow.builtin_configs``); here each one is parsed and compiled once into a handler.
"""

from __future__ import annotations

from typing import Any

import jmespath
from jmespath.exceptions import JMESPathError

from packetflow.builtin_configs import HttpConfig, TemplateConfig, TransformConfig
from packetflow.builtins.http import HttpHandler
from packetflow.builtins.templating import Filler
from packetflow.context import CallContext, Handler, never_suspends
from packetflow.errors import FieldViolation, InvalidInput
from packetflow.spec import BuiltinImplementation

__all__ = ["HttpHandler", "builtin_handler"]

# Plain dicts, not jmespath's default OrderedDict: outputs go straight to JSON and contracts.
_JMESPATH_OPTIONS = jmespath.Options(dict_cls=dict)


def builtin_handler(impl: BuiltinImplementation) -> Handler:
    """The handler of a builtin capability, its config parsed and compiled once.

    The ``http`` handler is an ``HttpHandler``: call its ``aclose()`` when retiring it.
    """
    if impl.name == "echo":
        return _echo
    if impl.name == "transform":
        return _transform(TransformConfig.model_validate(impl.config))
    if impl.name == "template":
        return _template(TemplateConfig.model_validate(impl.config))
    return HttpHandler(HttpConfig.model_validate(impl.config))


@never_suspends
async def _echo(value: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
    # A copy, so a later step changing the output cannot change the caller's input.
    return dict(value)


def _transform(config: TransformConfig) -> Handler:
    expression = jmespath.compile(config.expression)

    @never_suspends
    async def transform(value: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        try:
            result: Any = expression.search(value, options=_JMESPATH_OPTIONS)
        except JMESPathError as exc:
            # e.g. length(x) with x a number: the expression is fine, this input does not fit.
            raise InvalidInput([FieldViolation("input", f"transform failed: {exc}")]) from None
        # Not necessarily an object: the engine checks output against `provides`.
        return result  # type: ignore[no-any-return]

    return transform


def _template(config: TemplateConfig) -> Handler:
    filler = Filler(config.template)

    @never_suspends
    async def template(value: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        return {config.output: filler.fill(value)}

    return template
