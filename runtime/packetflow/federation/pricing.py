"""Metering and pricing: what one call costs, and an invoice over a period."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from packetflow.spec import Pricing

MONTH_S = 30 * 86400.0


def call_price(pricing: Pricing | None, ok: bool, output: Any = None) -> float:
    """The part of a call's price known when it ends: perExecution, or the revenue share of
    the output's revenue field; subscriptions are priced per period (see :func:`invoice`)."""
    if pricing is None or not ok:
        return 0.0
    if pricing.per_execution is not None:
        return pricing.per_execution
    share = pricing.revenue_share
    if share is not None and isinstance(output, dict):
        revenue = output.get(share.field)
        if isinstance(revenue, int | float) and not isinstance(revenue, bool) and revenue > 0:
            return float(revenue) * share.percent / 100.0
    return 0.0


@dataclass(frozen=True)
class Usage:
    """Calls of one capability with one peer in one direction over the period."""

    direction: str  # inbound: they called our export (we bill); outbound: we called theirs
    peer: str
    capability: str
    calls: int  # allowed calls
    ok: int
    errors: int
    denied: int
    metered: float  # sum of the per-call prices recorded
    currency: str


@dataclass(frozen=True)
class InvoiceLine:
    """One line of an invoice: a usage under its pricing model."""

    usage: Usage
    model: str
    amount: float
    detail: str

    def to_json(self) -> dict[str, Any]:
        """Plain data for ``--format json``."""
        u = self.usage
        return {"direction": u.direction, "peer": u.peer, "capability": u.capability,
                "calls": u.calls, "ok": u.ok, "errors": u.errors, "denied": u.denied,
                "model": self.model, "amount": round(self.amount, 6),
                "currency": u.currency, "detail": self.detail}


def invoice(usages: Iterable[Usage], pricing_of: Callable[[Usage], Pricing | None],
            period_s: float) -> list[InvoiceLine]:
    """Price each usage under its model over a period of ``period_s`` seconds."""
    lines = []
    months = period_s / MONTH_S
    for usage in usages:
        pricing = pricing_of(usage)
        if pricing is None:
            lines.append(InvoiceLine(usage, "free", 0.0, "no pricing"))
        elif pricing.subscription is not None:
            sub = pricing.subscription
            amount = sub.per_month * months
            detail = f"{sub.per_month:g}/month x {months:.4f} months"
            if sub.included_calls is not None:
                extra = max(0, usage.ok - int(sub.included_calls * months))
                amount += extra * sub.overage_per_execution
                detail += f" + {extra} calls over the allowance x {sub.overage_per_execution:g}"
            lines.append(InvoiceLine(usage, "subscription", amount, detail))
        elif pricing.revenue_share is not None:
            share = pricing.revenue_share
            lines.append(InvoiceLine(usage, "revenueShare", usage.metered,
                                     f"{share.percent:g}% of output field {share.field!r}"))
        else:
            lines.append(InvoiceLine(usage, "perExecution", usage.metered,
                                     f"{usage.ok} calls x {pricing.per_execution:g}"))
    return lines
