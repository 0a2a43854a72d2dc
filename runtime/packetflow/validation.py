"""Where a load error is: pydantic's ``loc`` turned into a manifest path, and the error an
implementation raises when it cannot load, naming its manifest field.

Below the spec models and the implementations, so composition and spec validation, builtins
and remote tools all name fields the same way manifests do.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import jmespath
from jmespath.exceptions import JMESPathError
from pydantic import ValidationError


def error_path(data: Any, loc: tuple[int | str, ...]) -> tuple[list[str | int], bool]:
    """Turn a pydantic ``loc`` into the path inside ``data``, dropping union-member tags.

    Returns the path and whether it was found in the data all the way down.
    """
    path: list[str | int] = []
    current = data
    for position, part in enumerate(loc):
        if _has_child(current, part):
            current = current[part]
            path.append(part)
        elif position == len(loc) - 1 or not isinstance(current, dict | list):
            # A missing or unexpected key at the end; tags of union members are skipped.
            if position == len(loc) - 1 and not _is_union_tag(part):
                path.append(part)
                return path, False
            return path, True
    return path, True


def _has_child(container: Any, part: int | str) -> bool:
    if isinstance(container, dict):
        return part in container
    return isinstance(container, list) and isinstance(part, int) and part < len(container)


def _is_union_tag(part: int | str) -> bool:
    return isinstance(part, str) and ("[" in part or part.startswith("function-"))


def format_path(path: Iterable[str | int]) -> str:
    """``['spec', 'requires', 'a']`` -> ``spec.requires.a``; list indices as ``[0]``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validation_errors(data: Any, exc: ValidationError) -> list[tuple[list[str | int], str]]:
    """One (path, message) per distinct path, in the order pydantic reported them."""
    seen: dict[str, tuple[list[str | int], str]] = {}
    for err in exc.errors():
        path, _ = error_path(data, tuple(err["loc"]))
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            message = "field required"
        elif err["type"] == "extra_forbidden":
            message = "unknown field"
        seen.setdefault(format_path(path), (path, message))
    return list(seen.values())


class ImplementationError(Exception):
    """The implementation cannot be loaded; ``path`` names the manifest field at fault."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


def checked_jmespath(value: str) -> str:
    """``value`` if it parses as JMESPath, else ``ValueError`` with a one-line reason; the
    deprecated `` `text` `` literal (jmespath warns, then guesses a string) is refused too."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PendingDeprecationWarning)
            jmespath.compile(value)
    except PendingDeprecationWarning:
        raise ValueError(f"invalid JMESPath expression {value!r}: a `...` literal must be "
                         "JSON (`\"text\"`, `1`); write a string as 'text'") from None
    except JMESPathError as exc:
        # jmespath's messages span lines (with a caret); one line reads better in a condition.
        detail = " ".join(str(exc).split())
        raise ValueError(f"invalid JMESPath expression {value!r}: {detail}") from None
    return value
