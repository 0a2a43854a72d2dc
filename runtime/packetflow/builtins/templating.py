"""Filling ``${name}`` / ``${user.name}`` placeholders from a call's input.

Shared by the ``template`` builtin (plain text) and the ``http`` builtin (URL-quoted values).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from packetflow.builtin_configs import FieldTemplate
from packetflow.errors import FieldViolation, InvalidInput

_MISSING = object()


def lookup(value: Any, path: str) -> Any:
    """The value at a dotted ``path`` (``user.name``, ``items.0``), or ``_MISSING``."""
    current = value
    for part in path.split("."):
        if isinstance(current, dict) and part in current:
            current = current[part]
        elif isinstance(current, list) and part.isdigit() and int(part) < len(current):
            current = current[int(part)]
        else:
            return _MISSING
    return current


def render_value(value: Any) -> str:
    """A JSON value as text: strings as they are, everything else as compact JSON."""
    if isinstance(value, str):
        return value
    # JSON spelling, not Python's: true rather than True, {"a":1} rather than {'a': 1}.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class Filler:
    """A template compiled once; ``fill`` renders it over one input."""

    def __init__(self, template: str, quote: Callable[[str], str] | None = None) -> None:
        self.template = FieldTemplate(template)
        self.names = self.template.get_identifiers()
        self._quote = quote

    def fill(self, value: dict[str, Any]) -> str:
        """Render over ``value``; every missing or null field is named in one InvalidInput."""
        rendered: dict[str, str] = {}
        violations: list[FieldViolation] = []
        for name in self.names:
            found = lookup(value, name)
            if found is _MISSING or found is None:
                # A null would render as "null" (e.g. /users/null): treat it like a gap.
                why = "missing" if found is _MISSING else "null"
                violations.append(
                    FieldViolation(f"input.{name}", f"required by the template but {why}"))
                continue
            text = render_value(found)
            rendered[name] = self._quote(text) if self._quote else text
        if violations:
            raise InvalidInput(violations)
        # substitute, not safe_substitute: every name is filled, and "$$" becomes "$".
        return self.template.substitute(rendered)
