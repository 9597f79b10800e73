"""A small Python client of the PersonalKV gRPC API (tests, the demo, scripts).

    with PersonalKVClient("127.0.0.1:50051", "127.0.0.1:50052", token) as client:
        client.create_concept("bo", "Bo", "dog", "my corgi")
        client.upload_photos("bo", [open("bo.jpg", "rb").read()])
        client.wait_ready("bo")
        print(client.ask("what is Bo doing?").answer)

Every call sends the bearer token and a deadline (`timeout_s`); errors surface as
grpc.RpcError with the server's status code and message. Against servers with TLS on
(PERSONALKV_SERVER_TLS_CERT_FILE) pass the CA to trust: ``root_certificates=open(ca, "rb").read()``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence

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


def open_channel(address: str, *, root_certificates: bytes | None = None, server_name: str = "",
                 options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
    """A channel to ``address``: TLS trusting ``root_certificates`` (PEM) when given, else
    plaintext. ``server_name``: the name the server's certificate carries, if not the host."""
    options = list(options)
    if root_certificates is None:
        return grpc.insecure_channel(address, options)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
    return grpc.secure_channel(address, credentials, options)


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
    def __init__(self, ingestion: str, answering: str, token: str, *, timeout_s: float = 60.0,
                 max_message_bytes: int = 64 << 20, root_certificates: bytes | None = None,
                 server_name: str = "") -> None:
        opts = [("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes)]
        self._channels = [open_channel(address, root_certificates=root_certificates,
                                       server_name=server_name, options=opts)
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
