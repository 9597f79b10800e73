"""The Python client of the PersonalKV gRPC API (scripts, services, the tests).

    with PersonalKVClient("https://ingest.example.com", "https://ask.example.com", token) as client:
        client.create_concept("bo", "Bo", "dog", "my corgi")
        client.upload_photos("bo", [open("bo.jpg", "rb").read()])
        client.wait_ready("bo")
        print(client.ask("what is Bo doing?").answer)

Slim: it needs grpcio and protobuf only (no torch, transformers, Milvus, Celery or pydantic;
tests/unit/test_import_graph.py checks), so `pip install --no-deps personalkv grpcio protobuf
typing-extensions` is enough for it (docs/operations.md).

Addresses: ``https://host[:port]`` is TLS (default port 443) trusting the system's CA bundle
(``SSL_CERT_FILE``, else OpenSSL's default file), ``http://host[:port]`` or ``host:port``
plaintext; ``tls=True`` or ``root_certificates=`` (PEM bytes of a private CA) turn TLS on for a
``host:port`` too. Every call sends the bearer token and a deadline (``timeout_s``); a call
answered UNAVAILABLE (a server restarting, a connection dropped) is retried by gRPC itself
with exponential backoff (``RETRY_POLICY``: 4 attempts within the deadline); other errors
surface as ``grpc.RpcError`` with the server's status code and message.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import grpc

from personalkv.api.v1 import (
    answering_pb2,
    answering_pb2_grpc,
    common_pb2,
    ingestion_pb2,
    ingestion_pb2_grpc,
)
from personalkv.auth import bearer_metadata

CHUNK_BYTES = 1 << 20
TERMINAL = (common_pb2.CONCEPT_STATE_READY, common_pb2.CONCEPT_STATE_FAILED)
SERVICES = ("personalkv.v1.IngestionService", "personalkv.v1.AnsweringService")
#: gRPC's retry policy for both services: UNAVAILABLE only (the request was not processed:
#: no connection, a server draining). RESOURCE_EXHAUSTED (overload) is left to the caller,
#: who knows whether waiting is worth it. A streamed upload is retried while it fits gRPC's
#: per-call retry buffer (256 KiB by default); a longer one fails with UNAVAILABLE as before.
RETRY_POLICY = {
    "maxAttempts": 4,
    "initialBackoff": "0.2s",
    "maxBackoff": "5s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}


def system_root_certificates() -> bytes | None:
    """PEM of the system's CA bundle: ``SSL_CERT_FILE``, else OpenSSL's default file; None
    when there is none (gRPC then uses the roots it ships)."""
    cafile = ssl.get_default_verify_paths().cafile  # honours SSL_CERT_FILE
    return Path(cafile).read_bytes() if cafile else None


def parse_address(address: str) -> tuple[str, bool]:
    """(``host:port``, whether the scheme asks for TLS): ``https://h`` -> ("h:443", True),
    ``http://h`` -> ("h:80", False), ``h:p`` -> ("h:p", False)."""
    if "://" not in address:
        return address, False
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(f"address {address!r}: use https://HOST[:PORT], http://HOST[:PORT] "
                         "or HOST:PORT")
    secure = parts.scheme == "https"
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{parts.port or (443 if secure else 80)}", secure


def open_channel(address: str, *, tls: bool | None = None, root_certificates: bytes | None = None,
                 server_name: str = "", options: Sequence[tuple[str, object]] = (),
                 retry: bool = True) -> grpc.Channel:
    """A channel to ``address`` (see the module docstring for the forms). TLS when the address
    is ``https://``, ``tls`` is True or ``root_certificates`` (PEM) are given: trusting those,
    else the system's CA bundle; ``tls=False`` forces plaintext. ``server_name``: the name on
    the server's certificate, if not the host. ``retry``: gRPC retries UNAVAILABLE
    (``RETRY_POLICY``)."""
    target, https = parse_address(address)
    secure = (https or root_certificates is not None) if tls is None else tls
    options = list(options)
    if retry:
        config = {"methodConfig": [{"name": [{"service": s} for s in SERVICES],
                                    "retryPolicy": RETRY_POLICY}]}
        options += [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(config))]
    if not secure:
        return grpc.insecure_channel(target, options)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=root_certificates or system_root_certificates())
    return grpc.secure_channel(target, credentials, options)


def upload_messages(concept_id: str, photos: Sequence[bytes], *, user_id: str = "",
                    chunk_bytes: int = CHUNK_BYTES) -> Iterator[ingestion_pb2.UploadPhotosRequest]:
    """The UploadPhotos stream: header, then each photo in chunks of `chunk_bytes`."""
    yield ingestion_pb2.UploadPhotosRequest(
        header=ingestion_pb2.UploadHeader(concept_id=concept_id, user_id=user_id))
    for photo in photos:
        pieces = [photo[i:i + chunk_bytes] for i in range(0, len(photo), chunk_bytes)] or [b""]
        for i, piece in enumerate(pieces):
            yield ingestion_pb2.UploadPhotosRequest(chunk=ingestion_pb2.PhotoChunk(
                data=piece, end_of_photo=i == len(pieces) - 1))


def ask_request(question: str, photos: Iterable[bytes] = (), *, conversation_id: str = "",
                start_conversation: bool = False, **options) -> answering_pb2.AskRequest:
    return answering_pb2.AskRequest(
        question=question, photos=[common_pb2.Photo(data=p) for p in photos],
        options=answering_pb2.AskOptions(**options), conversation_id=conversation_id,
        start_conversation=start_conversation,
    )


class PersonalKVClient:
    """Both services' stubs behind one token. ``timeout_s``: the default deadline of a call
    (``ask`` / ``ask_stream`` take their own); ``tls``, ``root_certificates``, ``server_name``
    and ``retry`` as in ``open_channel``."""

    def __init__(self, ingestion: str, answering: str, token: str, *, timeout_s: float = 60.0,
                 max_message_bytes: int = 64 << 20, tls: bool | None = None,
                 root_certificates: bytes | None = None, server_name: str = "",
                 retry: bool = True) -> None:
        opts = [("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes)]
        self._channels = [open_channel(address, tls=tls, root_certificates=root_certificates,
                                       server_name=server_name, options=opts, retry=retry)
                          for address in (ingestion, answering)]
        self.ingestion = ingestion_pb2_grpc.IngestionServiceStub(self._channels[0])
        self.answering = answering_pb2_grpc.AnsweringServiceStub(self._channels[1])
        self.metadata = bearer_metadata(token)
        self.timeout_s = timeout_s

    def _kw(self, timeout_s: float | None = None) -> dict:
        return {"metadata": self.metadata, "timeout": timeout_s or self.timeout_s}

    def create_concept(self, concept_id: str, name: str, category: str = "", info: str = ""):
        facts = common_pb2.ConceptFacts(name=name, category=category, info=info)
        return self.ingestion.CreateConcept(
            ingestion_pb2.CreateConceptRequest(concept_id=concept_id, facts=facts), **self._kw())

    def upload_photos(self, concept_id: str, photos: Sequence[bytes], **kw):
        return self.ingestion.UploadPhotos(upload_messages(concept_id, photos, **kw), **self._kw())

    def get_concept(self, concept_id: str):
        return self.ingestion.GetConcept(
            ingestion_pb2.GetConceptRequest(concept_id=concept_id), **self._kw())

    def list_concepts(self):
        reply = self.ingestion.ListConcepts(ingestion_pb2.ListConceptsRequest(), **self._kw())
        return list(reply.concepts)

    def delete_concept(self, concept_id: str, allow_missing: bool = False):
        return self.ingestion.DeleteConcept(ingestion_pb2.DeleteConceptRequest(
            concept_id=concept_id, allow_missing=allow_missing), **self._kw())

    def delete_user_data(self):
        return self.ingestion.DeleteUserData(ingestion_pb2.DeleteUserDataRequest(), **self._kw())

    def wait_ready(self, concept_id: str, timeout_s: float = 120.0, poll_s: float = 0.2):
        """Poll GetConcept until READY (returned) or FAILED / timeout (RuntimeError)."""
        deadline = time.monotonic() + timeout_s
        while True:
            concept = self.get_concept(concept_id)
            if concept.state == common_pb2.CONCEPT_STATE_READY:
                return concept
            if concept.state == common_pb2.CONCEPT_STATE_FAILED:
                raise RuntimeError(f"concept {concept_id} failed: {concept.failure_reason}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"concept {concept_id} not ready after {timeout_s}s "
                                   f"(state {common_pb2.ConceptState.Name(concept.state)})")
            time.sleep(poll_s)

    def ask(self, question: str, photos: Iterable[bytes] = (), timeout_s: float | None = None,
            **options) -> answering_pb2.AskResponse:
        return self.answering.Ask(ask_request(question, photos, **options), **self._kw(timeout_s))

    def ask_stream(self, question: str, photos: Iterable[bytes] = (), timeout_s: float | None = None,
                   **options) -> Iterator[answering_pb2.AskStreamResponse]:
        return self.answering.AskStream(ask_request(question, photos, **options), **self._kw(timeout_s))

    def list_conversations(self) -> list[answering_pb2.Conversation]:
        reply = self.answering.ListConversations(answering_pb2.ListConversationsRequest(),
                                                 **self._kw())
        return list(reply.conversations)

    def end_conversation(self, conversation_id: str) -> bool:
        request = answering_pb2.EndConversationRequest(conversation_id=conversation_id)
        return self.answering.EndConversation(request, **self._kw()).existed

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> PersonalKVClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
