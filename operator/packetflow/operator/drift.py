"""Pure drift detection: does a live object still hold what the operator rendered?

The live object always has more than the rendered one (defaults, status, server metadata,
other controllers' annotations), so "in sync" means the rendered fields are a subset of it.
The API server also canonicalises resource quantities ("1000m" -> "1"), which are compared
by value so a normalised object never looks drifted (that would patch on every event).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

_SUFFIXES = {
    "": Decimal(1), "m": Decimal("0.001"), "k": Decimal(10) ** 3, "M": Decimal(10) ** 6,
    "G": Decimal(10) ** 9, "T": Decimal(10) ** 12, "P": Decimal(10) ** 15, "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10, "Mi": Decimal(2) ** 20, "Gi": Decimal(2) ** 30, "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50, "Ei": Decimal(2) ** 60,
}
_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?$")


def parse_quantity(value: Any) -> Decimal | None:
    """A Kubernetes quantity ("500m", "1Gi", 2) as a number; None when it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return Decimal(str(value))
    if not isinstance(value, str):
        return None
    match = _QUANTITY.match(value.strip())
    if not match:
        return None
    try:
        return Decimal(match.group(1)) * _SUFFIXES[match.group(2) or ""]
    except InvalidOperation:
        return None


def is_subset(desired: Any, actual: Any, *, quantities: bool = False) -> bool:
    """Whether every field of ``desired`` is in ``actual`` with the same value.

    Lists match element by element and must have the same length (the operator owns the
    whole list). Under a ``resources`` key, values compare as quantities.
    """
    if isinstance(desired, Mapping):
        if not isinstance(actual, Mapping):
            return False
        return all(
            key in actual and is_subset(value, actual[key],
                                        quantities=quantities or key == "resources")
            for key, value in desired.items()
        )
    if isinstance(desired, list):
        return (isinstance(actual, list) and len(desired) == len(actual)
                and all(is_subset(d, a, quantities=quantities)
                        for d, a in zip(desired, actual, strict=True)))
    if quantities and desired != actual:
        wanted, live = parse_quantity(desired), parse_quantity(actual)
        return wanted is not None and wanted == live
    return bool(desired == actual) and type(desired) is type(actual)


def drift_patch(desired: Mapping[str, Any], actual: Mapping[str, Any]) -> dict[str, Any] | None:
    """A JSON merge patch bringing ``actual`` back to ``desired``, or None when in sync.

    Only the rendered fields are written: labels and annotations merge key by key (others'
    keys survive), lists are replaced whole, fields the renderer leaves out (a Deployment's
    replicas when an autoscaler owns them) are never touched.
    """
    patch: dict[str, Any] = {}
    meta = desired.get("metadata", {})
    live_meta = actual.get("metadata", {})
    for key in ("labels", "annotations"):
        if meta.get(key) and not is_subset(meta[key], live_meta.get(key) or {}):
            patch.setdefault("metadata", {})[key] = meta[key]
    for key, value in desired.items():
        if key in ("apiVersion", "kind", "metadata", "status"):
            continue
        if not is_subset(value, actual.get(key)):
            patch[key] = value
    return patch or None


# Workload spec fields the API server refuses to change after creation.
IMMUTABLE_SPEC_FIELDS: dict[str, tuple[str, ...]] = {
    "StatefulSet": ("selector", "serviceName", "volumeClaimTemplates", "podManagementPolicy"),
}


def narrow_spec_patch(kind: str, desired: Mapping[str, Any], actual: Mapping[str, Any],
                      patch: dict[str, Any] | None) -> tuple[dict[str, Any] | None, list[str]]:
    """For kinds with immutable spec fields: the patch with only the drifted ``spec`` keys,
    and the immutable ones among them (``spec.volumeClaimTemplates``...).

    Sending an unchanged immutable field back is not harmless: the API server compares it
    with its defaulted copy, and a list the patch replaces differs by the defaults (422).
    """
    immutable = IMMUTABLE_SPEC_FIELDS.get(kind)
    if patch is None or immutable is None or "spec" not in patch:
        return patch, []
    live_spec = actual.get("spec") or {}
    spec = {key: value for key, value in (desired.get("spec") or {}).items()
            if not is_subset(value, live_spec.get(key))}
    changed = [f"spec.{key}" for key in spec if key in immutable]
    narrowed = {**patch, "spec": spec} if spec else {k: v for k, v in patch.items()
                                                     if k != "spec"}
    return narrowed or None, changed
