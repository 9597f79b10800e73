"""Bearer tokens for one user; ``personalkv.api.interceptors.AuthInterceptor`` checks them on
every RPC.

A token is ``pkv1.<payload>.<signature>``: payload is base64url JSON ``{"sub": user_id,
"iat": issued, "exp": expires}`` (unix seconds), signature is base64url HMAC-SHA256 over
``pkv1.<payload>`` with the secret from AuthSettings (PERSONALKV_AUTH_SECRET). Verification
recomputes the MAC and compares in constant time before parsing anything, then checks the times
(finite numbers; not issued in the future nor expired, with AuthSettings.leeway_s of clock skew;
not valid for longer than AuthSettings.max_token_lifetime_s, so a leaked signing step cannot
mint a token that never expires) and validates the user id, so a token can never carry a bad id
into a storage key. Who calls what:

    mint_token(user_id, settings=)  `personalkv token --user U`, tests, an upstream login service
    verify_token(token, settings=)  -> user_id; AuthInterceptor, once per RPC
    current_user_id()               servicers, to learn whose data the RPC may touch
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import hashlib
import hmac
import json
import math
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from personalkv.ids import InvalidIdError, validate_user_id

if TYPE_CHECKING:  # annotations only: the Python client imports this module without pydantic
    from personalkv.config import AuthSettings

TOKEN_PREFIX = "pkv1"
DEV_SECRET = "dev-insecure-secret-change-me"
MIN_SECRET_BYTES = 32
# Methods served without a token: liveness probes and schema discovery carry no user data.
PUBLIC_METHOD_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

_current_user: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "personalkv_user_id", default=None
)


class InvalidTokenError(Exception):
    """A token that is missing, malformed, forged, expired or names an invalid user."""


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def check_secret(settings: AuthSettings) -> bytes:
    secret = settings.secret.get_secret_value().encode()
    if settings.require_secret and (secret == DEV_SECRET.encode() or len(secret) < MIN_SECRET_BYTES):
        raise RuntimeError(
            f"PERSONALKV_AUTH_SECRET must be set to at least {MIN_SECRET_BYTES} random bytes "
            "(PERSONALKV_AUTH_REQUIRE_SECRET is on)"
        )
    return secret


def _sign(signing_input: str, secret: bytes) -> str:
    return _b64e(hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest())


def sign_claims(claims: dict, settings: AuthSettings) -> str:
    """Sign arbitrary claims without validating them (tests use it to build bad tokens)."""
    payload = _b64e(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    signing_input = f"{TOKEN_PREFIX}.{payload}"
    return f"{signing_input}.{_sign(signing_input, check_secret(settings))}"


def mint_token(
    user_id: str, *, settings: AuthSettings, ttl_s: int | None = None,
    now: float | None = None,
) -> str:  # fmt: skip
    """A token for `user_id` valid for `ttl_s` seconds (default AuthSettings.token_ttl_s)."""
    validate_user_id(user_id)
    issued = int(time.time() if now is None else now)
    ttl = settings.token_ttl_s if ttl_s is None else ttl_s
    if ttl > settings.max_token_lifetime_s:
        raise ValueError(f"a token lifetime of {ttl} s is over PERSONALKV_AUTH_MAX_TOKEN_LIFETIME_S "
                         f"({settings.max_token_lifetime_s} s); verification would refuse it")
    return sign_claims({"sub": user_id, "iat": issued, "exp": issued + ttl}, settings)


def verify_token(token: str, *, settings: AuthSettings, now: float | None = None) -> str:
    """The user id `token` was signed for; raises InvalidTokenError with the reason."""
    parts = token.split(".") if isinstance(token, str) and token.isascii() else []
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        raise InvalidTokenError("malformed token (expected pkv1.<payload>.<signature>)")
    expected = _sign(f"{parts[0]}.{parts[1]}", check_secret(settings))
    if not hmac.compare_digest(expected.encode("ascii"), parts[2].encode("ascii")):
        raise InvalidTokenError("token signature does not verify")
    try:
        claims = json.loads(_b64d(parts[1]))
        user_id, issued, expires = claims["sub"], claims["iat"], claims["exp"]
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidTokenError("token payload is unreadable") from exc
    for name, value in (("issue time", issued), ("expiry", expires)):
        # json reads NaN and Infinity; bool is an int: neither is a time
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidTokenError(f"token {name} is not a number")
    now = time.time() if now is None else now
    if issued > now + settings.leeway_s:
        raise InvalidTokenError("token is issued in the future (check the issuer's clock)")
    if now > expires + settings.leeway_s:
        raise InvalidTokenError("token has expired")
    if expires - issued > settings.max_token_lifetime_s:  # with iat <= now: exp is bounded too
        raise InvalidTokenError(f"token lifetime is over the {settings.max_token_lifetime_s} s this "
                                "server accepts")
    try:
        return validate_user_id(user_id)
    except InvalidIdError as exc:
        raise InvalidTokenError(f"token names an invalid {exc}") from exc


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """gRPC call metadata carrying `token` (what clients pass as `metadata=`)."""
    return (("authorization", f"Bearer {token}"),)


def token_from_metadata(metadata) -> str:
    """The bearer token in invocation metadata; InvalidTokenError when absent or malformed."""
    values = [v for k, v in (metadata or ()) if k.lower() == "authorization"]
    if not values:
        raise InvalidTokenError("missing bearer token: send metadata 'authorization: Bearer <token>'")
    if len(values) > 1:
        raise InvalidTokenError("more than one authorization header")
    scheme, _, token = str(values[0]).partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise InvalidTokenError("authorization metadata must be 'Bearer <token>'")
    return token.strip()


def current_user_id() -> str:
    """The authenticated user of the RPC being served (set by AuthInterceptor)."""
    user_id = _current_user.get()
    if user_id is None:
        raise RuntimeError("no authenticated user: is AuthInterceptor installed on the server?")
    return user_id


@contextlib.contextmanager
def acting_as(user_id: str) -> Iterator[None]:
    """Run the enclosed code as `user_id` (what the interceptor does around a servicer)."""
    reset = _current_user.set(user_id)
    try:
        yield
    finally:
        try:
            _current_user.reset(reset)
        except ValueError:  # a streaming RPC's generator closed by GC from another context
            pass
