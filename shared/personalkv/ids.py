"""Validation of every id that becomes part of an object key, a file path or an index query.

Called by the storage layer (`personalkv.storage.chunk_store`), the manifest models and the
service entry points before an id touches anything else. Ids are a closed ASCII alphabet, so
no id can carry `/`, `..`, whitespace, upper/lower-case twins or look-alike unicode letters
into a key: we refuse rather than normalise, because a silently rewritten id could alias
another user's data.
"""

from __future__ import annotations

import hashlib
import re

ID_MAX_LEN = 64
# First character alphanumeric so an id can never be ".", "..", "-rf" or a hidden file name.
_ID_RE = re.compile(r"[a-z0-9][a-z0-9_-]*")
_HEX_DIGEST_RE = re.compile(r"[0-9a-f]{64}")


class InvalidIdError(ValueError):
    """An id (user, concept, photo, chunk) or an object key that must not be used."""


def _validate_name(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidIdError(f"{what} must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidIdError(f"{what} must not be empty")
    if len(value) > ID_MAX_LEN:
        raise InvalidIdError(f"{what} is {len(value)} characters long; the limit is {ID_MAX_LEN}")
    for ch in value:
        if not ch.isascii():
            raise InvalidIdError(f"{what} {value!r} contains non-ASCII character U+{ord(ch):04X}")
    if _ID_RE.fullmatch(value) is None:
        bad = next((ch for ch in value if not (ch.islower() or ch.isdigit() or ch in "_-")), None)
        reason = f"character {bad!r} is not allowed" if bad else "it must start with [a-z0-9]"
        raise InvalidIdError(f"{what} {value!r} is invalid: {reason} (allowed: a-z 0-9 _ -)")
    return value


def validate_user_id(value: object) -> str:
    """Return `value` if it is a valid user id (``[a-z0-9][a-z0-9_-]{0,63}``), else raise."""
    return _validate_name(value, "user id")


def validate_concept_id(value: object) -> str:
    """Return `value` if it is a valid concept id (same alphabet as user ids), else raise."""
    return _validate_name(value, "concept id")


def is_valid_id(value: object) -> bool:
    """Whether `value` passes validate_user_id / validate_concept_id (same alphabet)."""
    if not isinstance(value, str) or len(value) > ID_MAX_LEN:
        return False
    return _ID_RE.fullmatch(value) is not None


def validate_hex_digest(value: object, what: str = "digest") -> str:
    """Return `value` if it is a lower-case sha256 hex digest (photo ids, chunk ids)."""
    if not isinstance(value, str) or _HEX_DIGEST_RE.fullmatch(value) is None:
        raise InvalidIdError(f"{what} {value!r} is not a lower-case sha256 hex digest")
    return value


def user_scoped_digest(user_id: str, *parts: bytes, domain: str = "content") -> str:
    """sha256 over (domain, user id, parts): the content hash of anything a user owns.

    The user id is hashed in so two users who upload identical bytes never share an id or an
    object (no cross-tenant dedup, no "does this photo exist?" oracle). Parts are length-
    prefixed so (b"ab", b"c") and (b"a", b"bc") hash differently.
    """
    h = hashlib.sha256()
    for field in (domain.encode(), validate_user_id(user_id).encode(), *parts):
        h.update(len(field).to_bytes(8, "big"))
        h.update(field)
    return h.hexdigest()
