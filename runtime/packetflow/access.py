"""Authorization: may this proven caller call that capability or actor type?

A :class:`Policy` is compiled once per capability (or actor type) from its ``spec.access``:
every rule becomes a key in a dict, so a decision is two lookups whatever the number of rules.
Istio's order: a caller a ``deny`` rule names is refused; otherwise, with ``allow`` rules, it
must be named by one; with none, the default policy decides (``namespace``: callers from the
resource's own namespace; ``cluster``: any workload of the trust domain; ``deny``: nobody).

A Capability's or Actor's pods call with the identity of the ServiceAccount the operator
gives them, ``packetflow-<name>``; ``capability: <name>`` names exactly that account.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from packetflow.errors import PermissionDenied
from packetflow.identity.spiffe import Workload
from packetflow.spec import Access, AccessRule

DefaultPolicy = Literal["namespace", "cluster", "deny"]
DEFAULT_POLICIES: Final = ("namespace", "cluster", "deny")
WORKLOAD_ACCOUNT_PREFIX: Final = "packetflow-"


def workload_service_account(name: str) -> str:
    """The ServiceAccount a Capability's or Actor's pods run as (and are known by)."""
    return f"{WORKLOAD_ACCOUNT_PREFIX}{name}"


def rule_text(rule: AccessRule) -> str:
    """A rule as a manifest writes it: ``namespace: team-a``."""
    if rule.service_account is not None:
        return f"serviceAccount: {rule.service_account}"
    if rule.namespace is not None:
        return f"namespace: {rule.namespace}"
    return f"capability: {rule.capability}"


class AccessDenied(PermissionDenied):
    """A proven caller the target's policy refuses; ``rule`` names the deciding rule."""

    def __init__(self, message: str, rule: str) -> None:
        super().__init__(message)
        self.rule = rule


@dataclass(frozen=True)
class Decision:
    """A verdict, and the rule that made it (``deny[0]``, ``allow[2]``, ``allow``,
    ``default:namespace``: also the metric label of refusals)."""

    allowed: bool
    rule: str
    reason: str = ""


class _Rules:
    """One list of rules (allow or deny) as lookups: account -> index, namespace -> index."""

    def __init__(self, rules: list[AccessRule], home: str) -> None:
        self.rules = rules
        self.accounts: dict[Workload, int] = {}
        self.namespaces: dict[str, int] = {}
        for index, rule in enumerate(rules):
            if rule.namespace is not None:
                self.namespaces.setdefault(rule.namespace, index)
            elif rule.service_account is not None:
                self.accounts.setdefault(Workload.parse(rule.service_account), index)
            else:
                assert rule.capability is not None
                namespace, _, name = rule.capability.rpartition("/")
                self.accounts.setdefault(
                    Workload(namespace or home, workload_service_account(name)), index)

    def match(self, workload: Workload) -> int | None:
        """The index of the first rule naming ``workload``, if any."""
        by_account = self.accounts.get(workload)
        by_namespace = self.namespaces.get(workload.namespace)
        if by_account is None or by_namespace is None:
            return by_account if by_namespace is None else by_namespace
        return min(by_account, by_namespace)


class Policy:
    """Who may call one capability or actor type (``target``, e.g. ``capability 'echo'``)."""

    def __init__(self, target: str, access: Access | None, home_namespace: str,
                 default: DefaultPolicy = "namespace") -> None:
        self.target = target
        self.home = home_namespace
        self.default = default
        self.deny = _Rules(list(access.deny) if access else [], home_namespace)
        self.allow = _Rules(list(access.allow) if access else [], home_namespace)

    def decide(self, workload: Workload | None) -> Decision:
        """The verdict for a caller known as ``workload`` (None: a SPIFFE ID of our trust
        domain that names no namespace and service account)."""
        if workload is not None:
            denied = self.deny.match(workload)
            if denied is not None:
                return Decision(False, f"deny[{denied}]", f"refused by access.deny[{denied}] "
                                f"({rule_text(self.deny.rules[denied])})")
        if self.allow.rules:
            allowed = self.allow.match(workload) if workload is not None else None
            if allowed is None:
                return Decision(False, "allow", "named by no access.allow rule")
            return Decision(True, f"allow[{allowed}]")
        if self.default == "cluster":
            return Decision(True, "default:cluster")
        if self.default == "namespace" and workload is not None \
                and workload.namespace == self.home:
            return Decision(True, "default:namespace")
        why = ("admits nobody without access.allow rules" if self.default == "deny" else
               f"admits callers from namespace {self.home!r} only")
        return Decision(False, f"default:{self.default}",
                        f"no access rules, and the default policy {self.default!r} {why}")

    def check(self, caller: str, workload: Workload | None) -> None:
        """Return if ``caller`` may call; else :class:`AccessDenied` naming the rule."""
        decision = self.decide(workload)
        if not decision.allowed:
            raise AccessDenied(f"{caller} may not call {self.target}: {decision.reason}",
                               decision.rule)
