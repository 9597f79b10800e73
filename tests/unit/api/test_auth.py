"""Bearer tokens: mint/verify round trip, forgery, expiry, bad ids, metadata parsing."""

from __future__ import annotations

import time

import pytest

from personalkv.auth import (
    InvalidTokenError,
    acting_as,
    bearer_metadata,
    current_user_id,
    mint_token,
    sign_claims,
    token_from_metadata,
    verify_token,
)  # fmt: skip
from personalkv.config import AuthSettings
from personalkv.ids import InvalidIdError

SETTINGS = AuthSettings(secret="k" * 40, token_ttl_s=60, leeway_s=5)
OTHER = AuthSettings(secret="x" * 40)


def test_round_trip():
    token = mint_token("alice", settings=SETTINGS)
    assert verify_token(token, settings=SETTINGS) == "alice"


def test_token_signed_with_another_secret_is_refused():
    token = mint_token("alice", settings=OTHER)
    with pytest.raises(InvalidTokenError, match="signature"):
        verify_token(token, settings=SETTINGS)


def test_payload_swapped_under_a_valid_signature_is_refused():
    alice = mint_token("alice", settings=SETTINGS).split(".")
    bob = mint_token("bob", settings=SETTINGS).split(".")
    forged = ".".join([alice[0], bob[1], alice[2]])
    with pytest.raises(InvalidTokenError, match="signature"):
        verify_token(forged, settings=SETTINGS)


@pytest.mark.parametrize("token", ["", "abc", "pkv1.a", "pkv2.a.b", "pkv1.a.b.c", "pkv1..", "pkv1.é.ü"])
def test_malformed_tokens_are_refused(token):
    with pytest.raises(InvalidTokenError):
        verify_token(token, settings=SETTINGS)


def test_expiry_with_leeway():
    token = mint_token("alice", settings=SETTINGS, now=1000)
    assert verify_token(token, settings=SETTINGS, now=1000 + 60 + 5) == "alice"
    with pytest.raises(InvalidTokenError, match="expired"):
        verify_token(token, settings=SETTINGS, now=1000 + 60 + 6)


def test_mint_refuses_bad_user_ids_and_verify_refuses_them_even_when_signed():
    with pytest.raises(InvalidIdError):
        mint_token("../x", settings=SETTINGS)
    now = int(time.time())
    signed = sign_claims({"sub": "../x", "iat": now, "exp": now + 60}, SETTINGS)
    with pytest.raises(InvalidTokenError, match="invalid user id"):
        verify_token(signed, settings=SETTINGS)


def test_unreadable_payload_and_missing_claims():
    for claims in ({"iat": 0}, {"sub": "a"}, {"sub": "a", "exp": "later"}):
        with pytest.raises(InvalidTokenError):
            verify_token(sign_claims(claims, SETTINGS), settings=SETTINGS)


YEAR_S = 365 * 86_400


@pytest.mark.parametrize("claims, reason", [
    ({"iat": 1000 + YEAR_S, "exp": 1000 + YEAR_S + 60}, "issued in the future"),
    ({"iat": 1000 + 6, "exp": 1000 + 60}, "issued in the future"),  # past the 5 s leeway
    ({"iat": 1000, "exp": 1e308}, "lifetime"),
    ({"iat": 1000, "exp": 1000 + SETTINGS.max_token_lifetime_s + 1}, "lifetime"),
    ({"iat": 0, "exp": 2**40}, "lifetime"),
    ({"iat": 1000, "exp": float("inf")}, "expiry is not a number"),
    ({"iat": float("nan"), "exp": 1060}, "issue time is not a number"),
    ({"iat": True, "exp": 1060}, "issue time is not a number"),
    ({"exp": 1060}, "unreadable"),  # every token we mint has iat
])
def test_tokens_from_the_future_or_living_too_long_are_refused(claims, reason):
    token = sign_claims({"sub": "alice", **claims}, SETTINGS)
    with pytest.raises(InvalidTokenError, match=reason):
        verify_token(token, settings=SETTINGS, now=1000)


def test_clock_skew_within_the_leeway_and_the_longest_lifetime_are_accepted():
    longest = SETTINGS.max_token_lifetime_s
    for claims in ({"iat": 1005, "exp": 1060}, {"iat": 1000, "exp": 1000 + longest}):
        assert verify_token(sign_claims({"sub": "alice", **claims}, SETTINGS),
                            settings=SETTINGS, now=1000) == "alice"
    with pytest.raises(ValueError, match="MAX_TOKEN_LIFETIME"):
        mint_token("alice", settings=SETTINGS, ttl_s=longest + 1)


def test_require_secret_refuses_the_dev_default():
    with pytest.raises(RuntimeError, match="PERSONALKV_AUTH_SECRET"):
        mint_token("alice", settings=AuthSettings(require_secret=True))


def test_metadata_parsing():
    assert token_from_metadata(bearer_metadata("t0k")) == "t0k"
    assert token_from_metadata((("Authorization", "bearer  t0k "),)) == "t0k"
    for metadata in ((), (("authorization", "Basic abc"),), (("authorization", "Bearer "),),
                     (("authorization", "Bearer a"), ("authorization", "Bearer b"))):
        with pytest.raises(InvalidTokenError):
            token_from_metadata(metadata)


def test_current_user_is_scoped():
    with pytest.raises(RuntimeError):
        current_user_id()
    with acting_as("alice"):
        assert current_user_id() == "alice"
        with acting_as("bob"):
            assert current_user_id() == "bob"
        assert current_user_id() == "alice"
    with pytest.raises(RuntimeError):
        current_user_id()
