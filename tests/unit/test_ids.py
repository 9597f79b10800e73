"""Id validation: the gate every user/concept/photo/chunk id passes before touching a key."""

import hashlib
import posixpath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from personalkv.ids import (
    InvalidIdError,
    is_valid_id,
    user_scoped_digest,
    validate_concept_id,
    validate_hex_digest,
    validate_user_id,
)

GOOD = ["a", "0", "alice", "user_42", "my-dog", "a" * 64, "9-_"]
BAD = [
    ("", "empty"),
    ("a" * 65, "limit"),
    ("../etc", "'.'"),
    ("a/b", "'/'"),
    ("..", "'.'"),
    (".hidden", "'.'"),
    ("Alice", "'A'"),
    ("al ice", "' '"),
    ("a\x00b", "'\\x00'"),
    ("alice\n", "'\\n'"),
    ("-rf", "start"),
    ("_x", "start"),
    ("аlice", "non-ASCII"),  # Cyrillic a
    ("ａlice", "non-ASCII"),  # fullwidth a
    ("a\u200bb", "non-ASCII"),  # zero-width space
    ("a\\b", "'\\\\'"),
    ("a%2fb", "'%'"),
]


@pytest.mark.parametrize("value", GOOD)
@pytest.mark.parametrize("validate", [validate_user_id, validate_concept_id])
def test_valid_ids_pass_unchanged(validate, value):
    assert validate(value) == value
    assert is_valid_id(value)


@pytest.mark.parametrize("value,why", BAD)
@pytest.mark.parametrize("validate", [validate_user_id, validate_concept_id])
def test_invalid_ids_are_refused_with_a_reason(validate, value, why):
    with pytest.raises(InvalidIdError) as excinfo:
        validate(value)
    assert why in str(excinfo.value)
    assert isinstance(excinfo.value, ValueError)
    assert not is_valid_id(value)


@pytest.mark.parametrize("value", [None, 3, b"alice", ["a"]])
def test_non_strings_are_refused(value):
    with pytest.raises(InvalidIdError, match="must be a string"):
        validate_user_id(value)


def test_hex_digest():
    digest = hashlib.sha256(b"x").hexdigest()
    assert validate_hex_digest(digest) == digest
    for bad in [digest.upper(), digest[:-1], digest + "0", "../" + digest[3:], "", None]:
        with pytest.raises(InvalidIdError, match="sha256"):
            validate_hex_digest(bad, "chunk id")


def test_user_scoped_digest_separates_users_and_fields():
    same_bytes = b"identical photo"
    assert user_scoped_digest("alice", same_bytes) != user_scoped_digest("bob", same_bytes)
    assert user_scoped_digest("alice", b"ab", b"c") != user_scoped_digest("alice", b"a", b"bc")
    assert user_scoped_digest("alice", b"x", domain="photo") != user_scoped_digest("alice", b"x")
    assert user_scoped_digest("alice", same_bytes) == user_scoped_digest("alice", same_bytes)
    validate_hex_digest(user_scoped_digest("alice", same_bytes))
    with pytest.raises(InvalidIdError):
        user_scoped_digest("../bob", same_bytes)


@given(st.text(max_size=80))
@settings(max_examples=300, deadline=None)
def test_any_accepted_id_is_one_inert_path_segment(value):
    try:
        validate_user_id(value)
    except InvalidIdError:
        return
    assert value.isascii() and value == value.strip() and value not in (".", "..")
    assert "/" not in value and "\\" not in value and "%" not in value
    assert posixpath.normpath(f"users/{value}") == f"users/{value}"
