"""What a TokenReview's answer proves (pure: no API server)."""

from __future__ import annotations

import base64

import orjson
import pytest

from packetflow.identity.tokens import decide_review, token_expiry
from packetflow.identity.x509 import AuthenticationError

ALICE = {"authenticated": True, "audiences": ["packetflow"],
         "user": {"username": "system:serviceaccount:team-a:alice"}}


def test_a_service_accounts_token_is_its_spiffe_id() -> None:
    principal = decide_review(ALICE, "packetflow", "cluster.test", 1234.0)
    assert principal.caller == "spiffe://cluster.test/ns/team-a/sa/alice"
    assert (principal.not_after, principal.source) == (1234.0, "token")


@pytest.mark.parametrize(("status", "reason"), [
    ({"authenticated": False, "error": "invalid bearer token"}, "token-refused"),
    ({**ALICE, "audiences": ["vault"]}, "wrong-audience"),
    ({**ALICE, "user": {"username": "jane@example.com"}}, "not-a-service-account"),
    ({**ALICE, "user": {"username": "system:serviceaccount:Team_A:alice"}},
     "not-a-service-account"),
])
def test_anything_else_proves_nobody(status: dict[str, object], reason: str) -> None:
    with pytest.raises(AuthenticationError) as caught:
        decide_review(status, "packetflow", "cluster.test", None)
    assert caught.value.reason == reason


def test_the_expiry_of_a_jwt_is_read_without_trusting_it() -> None:
    claims = base64.urlsafe_b64encode(orjson.dumps({"exp": 1700000000})).rstrip(b"=").decode()
    assert token_expiry(f"e30.{claims}.sig") == 1700000000.0
    assert token_expiry("opaque") is None
    assert token_expiry("a.!!!.c") is None
