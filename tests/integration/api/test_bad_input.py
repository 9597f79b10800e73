"""Every bad input gets a precise status and a message; the server keeps serving; nothing is
stored. Runs over real gRPC against in-process servers (see conftest)."""

from __future__ import annotations

import struct
import time
import zlib

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from personalkv.api.client import ask_request, upload_messages
from personalkv.api.v1 import common_pb2, ingestion_pb2
from personalkv.auth import bearer_metadata, mint_token, sign_claims
from personalkv.config import AuthSettings
from tests.integration.api.conftest import AUTH, MAX_PHOTO_BYTES, png, status_of

C = grpc.StatusCode


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming width x height, and a tiny IDAT: a
    decompression bomb's header without its gigabytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def alice(api):
    client = api.client("alice")
    client.create_concept("mug", "Blue mug", "mug", "my favourite mug")
    yield client
    client.close()


def assert_serving(api, alice):
    channel = grpc.insecure_channel(api.ingestion_addr)
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert alice.get_concept("mug").concept_id == "mug"  # a real RPC still works
    channel.close()


def assert_no_photos_stored(api, user="alice"):
    assert [k for k in api.stored_keys(user) if "/photos/" in k] == []


BAD_PHOTOS = [
    ("corrupt", b"\x89PNG\r\n\x1a\n" + b"garbage" * 50, C.INVALID_ARGUMENT, "not a readable image"),
    ("zero_bytes", b"", C.INVALID_ARGUMENT, "empty"),
    ("truncated_jpeg", png(1, fmt="JPEG")[:300], C.INVALID_ARGUMENT, "image"),
    ("bomb_30000x30000", png_header_only(30000, 30000), C.RESOURCE_EXHAUSTED, "pixels"),
    ("unsupported_tiff", png(2, fmt="TIFF"), C.INVALID_ARGUMENT, "not accepted"),
    ("above_size_limit", b"\xff\xd8" + b"\0" * MAX_PHOTO_BYTES, C.RESOURCE_EXHAUSTED, "size limit"),
]


@pytest.mark.parametrize(("data", "code", "words"), [c[1:] for c in BAD_PHOTOS],
                         ids=[c[0] for c in BAD_PHOTOS])
def test_bad_photo_upload_is_refused_and_nothing_is_stored(api, alice, data, code, words):
    # A good photo first in the same stream: all-or-nothing, it must not be stored either.
    got = status_of(lambda: alice.upload_photos("mug", [png(3), data], chunk_bytes=64 * 1024))
    assert got[0] == code, got
    assert words in got[1], got
    assert_no_photos_stored(api)
    assert alice.get_concept("mug").state == common_pb2.CONCEPT_STATE_QUEUED
    assert_serving(api, alice)


@pytest.mark.parametrize(("data", "code", "words"), [c[1:] for c in BAD_PHOTOS],
                         ids=[c[0] for c in BAD_PHOTOS])
def test_bad_photo_in_ask_is_refused(api, alice, data, code, words):
    if len(data) > MAX_PHOTO_BYTES:
        words = "limit"
    got = status_of(lambda: alice.ask("is this my mug?", [data]))
    assert got[0] == code and words in got[1], got
    assert_serving(api, alice)


def test_unknown_concept(api, alice):
    assert status_of(lambda: alice.get_concept("nope")) == (C.NOT_FOUND, "concept 'nope' does not exist")
    assert status_of(lambda: alice.upload_photos("nope", [png(4)]))[0] == C.NOT_FOUND
    assert status_of(lambda: alice.delete_concept("nope"))[0] == C.NOT_FOUND
    alice.delete_concept("nope", allow_missing=True)
    assert api.stored_keys("alice") == ["users/alice/concepts/mug/manifest.json"]


@pytest.mark.parametrize("bad_id", ["../x", "..", "A", "a/b", "x" * 65, "é", ""])
def test_bad_concept_ids(api, alice, bad_id):
    code, message = status_of(lambda: alice.create_concept(bad_id, "name"))
    assert code == C.INVALID_ARGUMENT and "concept id" in message
    code, message = status_of(lambda: alice.upload_photos(bad_id, [png(5)]))
    assert code == C.INVALID_ARGUMENT and "concept id" in message
    assert_no_photos_stored(api)


def test_user_id_like_dot_dot_slash(api, alice):
    # In the request: validated first (INVALID_ARGUMENT), never compared or used as a path.
    req = ingestion_pb2.ListConceptsRequest(user_id="../x")
    code, message = status_of(
        lambda: alice.ingestion.ListConcepts(req, metadata=alice.metadata, timeout=10))
    assert code == C.INVALID_ARGUMENT and "user id '../x'" in message
    # In a correctly signed token: the token is refused.
    now = int(time.time())
    token = sign_claims({"sub": "../x", "iat": now, "exp": now + 600}, AUTH)
    with api.client(token=token) as bad:
        code, message = status_of(lambda: bad.list_concepts())
    assert code == C.UNAUTHENTICATED and "invalid user id" in message
    assert not [k for k in api.services.store.objects.list("") if ".." in k or k.startswith("users/x/")]


@pytest.mark.parametrize(("question", "words"), [("", "empty"), ("   ", "empty"),
                                                 ("q" * 100_000, "the limit is")])
def test_bad_questions(api, alice, question, words):
    for call in (lambda: alice.ask(question),
                 lambda: list(alice.ask_stream(question))):
        code, message = status_of(call)
        assert code == C.INVALID_ARGUMENT and words in message, message
    assert_serving(api, alice)


def test_bad_options(api, alice):
    code, message = status_of(lambda: alice.ask("hi", max_new_tokens=100_000))
    assert code == C.INVALID_ARGUMENT and "max_new_tokens" in message
    code, message = status_of(lambda: alice.ask("hi", top_p=0.0))
    assert code == C.INVALID_ARGUMENT and "top_p" in message


@pytest.mark.parametrize("case", ["missing", "not_bearer", "garbage", "forged", "other_secret",
                                  "expired", "issued_next_year", "never_expires"])
def test_bad_tokens_are_unauthenticated_on_every_service(api, alice, case):
    good = mint_token("alice", settings=AUTH)
    metadata = {
        "missing": (),
        "not_bearer": (("authorization", f"Basic {good}"),),
        "garbage": bearer_metadata("not-a-token"),
        "forged": bearer_metadata(good[:-2] + ("AA" if not good.endswith("AA") else "BB")),
        "other_secret": bearer_metadata(mint_token("alice", settings=AuthSettings(secret="y" * 40))),
        "expired": bearer_metadata(mint_token("alice", settings=AUTH, now=0)),
        "issued_next_year": bearer_metadata(mint_token("alice", settings=AUTH,
                                                       now=time.time() + 365 * 86_400)),
        "never_expires": bearer_metadata(sign_claims(
            {"sub": "alice", "iat": int(time.time()), "exp": 1e308}, AUTH)),
    }[case]
    calls = [
        lambda: alice.ingestion.ListConcepts(ingestion_pb2.ListConceptsRequest(), metadata=metadata, timeout=10),
        lambda: alice.ingestion.UploadPhotos(upload_messages("mug", [png(6)]), metadata=metadata, timeout=10),
        lambda: alice.ingestion.DeleteUserData(ingestion_pb2.DeleteUserDataRequest(), metadata=metadata, timeout=10),
        lambda: alice.answering.Ask(ask_request("hi"), metadata=metadata, timeout=10),
        lambda: list(alice.answering.AskStream(ask_request("hi"), metadata=metadata, timeout=10)),
    ]
    for call in calls:
        code, message = status_of(call)
        assert code == C.UNAUTHENTICATED and message, (code, message)
    assert_no_photos_stored(api)
    assert alice.get_concept("mug").concept_id == "mug"  # DeleteUserData did nothing


def test_another_users_concept(api, alice):
    with api.client("bob") as bob:
        # Concepts live in the caller's namespace: alice's is simply not there for bob.
        assert status_of(lambda: bob.get_concept("mug"))[0] == C.NOT_FOUND
        assert status_of(lambda: bob.upload_photos("mug", [png(7)]))[0] == C.NOT_FOUND
        assert status_of(lambda: bob.delete_concept("mug"))[0] == C.NOT_FOUND
        assert bob.list_concepts() == []
        # Naming alice explicitly with bob's token is refused outright.
        req = ingestion_pb2.GetConceptRequest(user_id="alice", concept_id="mug")
        code, message = status_of(lambda: bob.ingestion.GetConcept(req, metadata=bob.metadata, timeout=10))
        assert code == C.PERMISSION_DENIED and "its own user" in message
        req = ingestion_pb2.DeleteUserDataRequest(user_id="alice")
        code, _ = status_of(lambda: bob.ingestion.DeleteUserData(req, metadata=bob.metadata, timeout=10))
        assert code == C.PERMISSION_DENIED
        assert bob.delete_user_data().concepts_deleted == 0
    assert alice.get_concept("mug").facts.name == "Blue mug"
    assert_no_photos_stored(api, "bob")
    assert api.stored_keys("bob") == []


def test_create_twice_is_already_exists(api, alice):
    code, message = status_of(lambda: alice.create_concept("mug", "again"))
    assert code == C.ALREADY_EXISTS and "already exists" in message
    code, message = status_of(lambda: alice.create_concept("noname", ""))
    assert code == C.INVALID_ARGUMENT and "name" in message


def test_upload_stream_framing(api, alice):
    header = ingestion_pb2.UploadPhotosRequest(header=ingestion_pb2.UploadHeader(concept_id="mug"))
    chunk = ingestion_pb2.UploadPhotosRequest(chunk=ingestion_pb2.PhotoChunk(data=png(8), end_of_photo=True))
    unfinished = ingestion_pb2.UploadPhotosRequest(chunk=ingestion_pb2.PhotoChunk(data=png(8)))
    for messages, words in [([chunk], "first"), ([header, header], "only the first"),
                            ([header], "no photos"), ([header, unfinished], "inside a photo")]:
        code, message = status_of(lambda msgs=messages: alice.ingestion.UploadPhotos(
            iter(msgs), metadata=alice.metadata, timeout=10))
        assert code == C.INVALID_ARGUMENT and words in message, message
    assert_no_photos_stored(api)


# A string field (GetConceptRequest.concept_id, field 2) holding bytes that are not UTF-8, a
# length prefix running past the end, and a field number 0: none parses as the request.
UNDECODABLE = {
    "invalid utf-8": b"\x12\x02\xff\xfe",
    "truncated": b"\x12\x50abc",
    "field zero": b"\x00\x01",
}


@pytest.mark.parametrize("data", UNDECODABLE.values(), ids=UNDECODABLE.keys())
def test_undecodable_requests_are_invalid_argument_with_a_request_id(api, alice, data, caplog):
    raw = lambda method: grpc.insecure_channel(api.ingestion_addr).unary_unary(  # noqa: E731
        f"/personalkv.v1.IngestionService/{method}")  # bytes in, bytes out
    with caplog.at_level("INFO"):
        code, details = status_of(lambda: raw("GetConcept")(data, metadata=alice.metadata,
                                                            timeout=10))
    assert code == C.INVALID_ARGUMENT, details
    assert "not a valid personalkv.v1.GetConceptRequest" in details and "request id" in details
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= 40], [
        r.getMessage() for r in caplog.records if r.exc_info or r.levelno >= 40]
    # a request stream: the second message (a photo chunk) does not parse
    stream = grpc.insecure_channel(api.ingestion_addr).stream_unary(
        "/personalkv.v1.IngestionService/UploadPhotos")
    header = ingestion_pb2.UploadPhotosRequest(
        header=ingestion_pb2.UploadHeader(concept_id="mug")).SerializeToString()
    code, details = status_of(lambda: stream(iter([header, data]), metadata=alice.metadata,
                                             timeout=10))
    assert code == C.INVALID_ARGUMENT and "UploadPhotosRequest" in details, details
    assert_no_photos_stored(api)
    assert_serving(api, alice)
