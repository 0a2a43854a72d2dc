"""Access policies without I/O: which rule decides for which caller (deny overrides allow,
the default policies), and manifests' access rules checked field by field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from packetflow.access import AccessDenied, DefaultPolicy, Policy, workload_service_account
from packetflow.identity.spiffe import Workload
from packetflow.spec import Access, AccessRule


def access(allow: list[dict[str, str]] | None = None,
           deny: list[dict[str, str]] | None = None) -> Access:
    return Access.model_validate({"allow": allow or [], "deny": deny or []})


def decide(policy: Policy, namespace: str, account: str) -> tuple[bool, str]:
    decision = policy.decide(Workload(namespace, account))
    return decision.allowed, decision.rule


def test_allow_rules_name_accounts_namespaces_and_capabilities() -> None:
    policy = Policy("capability 'pay'", access(allow=[
        {"serviceAccount": "team-b/reporter"}, {"namespace": "team-c"},
        {"capability": "billing"}, {"capability": "ops/audit"}]), "team-a")
    assert decide(policy, "team-b", "reporter") == (True, "allow[0]")
    assert decide(policy, "team-c", "anyone") == (True, "allow[1]")
    assert decide(policy, "team-a", workload_service_account("billing")) == (True, "allow[2]")
    assert decide(policy, "ops", "packetflow-audit") == (True, "allow[3]")
    # With allow rules, even the home namespace must be named.
    assert decide(policy, "team-a", "alice") == (False, "allow")
    assert decide(policy, "team-b", "writer") == (False, "allow")
    assert decide(policy, "team-b", "packetflow-billing") == (False, "allow")


def test_deny_overrides_allow() -> None:
    policy = Policy("capability 'pay'", access(
        allow=[{"namespace": "team-c"}, {"serviceAccount": "team-c/intruder"}],
        deny=[{"namespace": "quarantine"}, {"serviceAccount": "team-c/intruder"}]), "team-a")
    assert decide(policy, "team-c", "intruder") == (False, "deny[1]")
    assert decide(policy, "team-c", "friend") == (True, "allow[0]")
    assert decide(policy, "quarantine", "x") == (False, "deny[0]")


def test_deny_alone_leaves_the_default_policy_to_decide_the_rest() -> None:
    policy = Policy("capability 'pay'", access(deny=[{"serviceAccount": "team-a/mallory"}]),
                    "team-a")
    assert decide(policy, "team-a", "mallory") == (False, "deny[0]")
    assert decide(policy, "team-a", "alice") == (True, "default:namespace")
    assert decide(policy, "team-b", "bob") == (False, "default:namespace")


def test_the_first_matching_rule_is_named() -> None:
    policy = Policy("capability 'pay'", access(deny=[
        {"namespace": "team-c"}, {"serviceAccount": "team-c/x"}]), "team-a")
    assert decide(policy, "team-c", "x") == (False, "deny[0]")
    policy = Policy("capability 'pay'", access(deny=[
        {"serviceAccount": "team-c/x"}, {"namespace": "team-c"}]), "team-a")
    assert decide(policy, "team-c", "x") == (False, "deny[0]")
    assert decide(policy, "team-c", "y") == (False, "deny[1]")


@pytest.mark.parametrize(("default", "home", "other"), [
    ("namespace", (True, "default:namespace"), (False, "default:namespace")),
    ("cluster", (True, "default:cluster"), (True, "default:cluster")),
    ("deny", (False, "default:deny"), (False, "default:deny")),
])
def test_default_policies_without_access(default: DefaultPolicy, home: tuple[bool, str],
                                         other: tuple[bool, str]) -> None:
    policy = Policy("capability 'pay'", None, "team-a", default)
    assert decide(policy, "team-a", "alice") == home
    assert decide(policy, "team-b", "bob") == other


def test_a_trust_domain_id_that_names_no_workload_is_only_let_in_by_cluster() -> None:
    assert not Policy("c", None, "team-a").decide(None).allowed
    assert Policy("c", None, "team-a", "cluster").decide(None).allowed
    assert not Policy("c", access(allow=[{"namespace": "team-a"}]), "team-a").decide(
        None).allowed


def test_refusals_name_the_target_the_caller_and_the_rule() -> None:
    policy = Policy("capability 'pay'", access(
        allow=[{"namespace": "team-c"}], deny=[{"serviceAccount": "team-c/intruder"}]),
        "team-a")
    caller = "spiffe://cluster.test/ns/team-c/sa/intruder"
    with pytest.raises(AccessDenied) as caught:
        policy.check(caller, Workload("team-c", "intruder"))
    assert caught.value.rule == "deny[0]"
    assert str(caught.value) == (f"{caller} may not call capability 'pay': refused by "
                                 "access.deny[0] (serviceAccount: team-c/intruder)")
    with pytest.raises(AccessDenied, match=r"named by no access\.allow rule"):
        policy.check("x", Workload("team-b", "bob"))
    with pytest.raises(AccessDenied, match="default policy 'namespace' admits callers from "
                       "namespace 'team-a' only"):
        Policy("capability 'pay'", None, "team-a").check("x", Workload("team-b", "bob"))
    policy.check("y", Workload("team-c", "friend"))  # allowed: returns


@pytest.mark.parametrize(("rule", "field"), [
    ({}, "exactly one of serviceAccount, namespace, capability"),
    ({"namespace": "a", "capability": "b"}, "exactly one of"),
    ({"serviceAccount": "no-namespace"}, "serviceAccount"),
    ({"serviceAccount": "Team/x"}, "serviceAccount"),
    ({"namespace": "Team_A"}, "namespace"),
    ({"capability": "a/b/c"}, "capability"),
    ({"user": "bob"}, "user"),
])
def test_bad_access_rules_name_the_field(rule: dict[str, str], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        AccessRule.model_validate(rule)


def test_access_lists_are_bounded() -> None:
    with pytest.raises(ValidationError, match="allow"):
        access(allow=[{"namespace": f"n{i}"} for i in range(65)])
