"""A client that cancels an upload stream half way: the server logs it as cancelled (INFO, no
traceback) and records CANCELLED, not an ERROR / INTERNAL; nothing of the upload is stored."""

from __future__ import annotations

import logging
import threading
import time

import grpc

from personalkv.api.v1 import ingestion_pb2, ingestion_pb2_grpc
from personalkv.observability import REGISTRY
from personalkv.service_layer import answering
from tests.integration.api.conftest import png


def _count(method: str, code: str) -> float:
    value = REGISTRY.get_sample_value("personalkv_grpc_request_duration_seconds_count",
                                      {"service": "ingestion", "method": method, "code": code})
    return value or 0.0


def test_cancelled_upload_is_logged_as_cancelled_not_as_an_error(api, caplog):
    client = api.client("cancelling-client")
    client.create_concept("kite", "Kite")
    stub = ingestion_pb2_grpc.IngestionServiceStub(grpc.insecure_channel(api.ingestion_addr))
    sent_first = threading.Event()
    release = threading.Event()
    data = png(3)

    def messages():
        yield ingestion_pb2.UploadPhotosRequest(header=ingestion_pb2.UploadHeader(concept_id="kite"))
        yield ingestion_pb2.UploadPhotosRequest(chunk=ingestion_pb2.PhotoChunk(data=data[:100]))
        sent_first.set()
        release.wait(30)  # the client stalls mid-photo, then cancels

    before = _count("UploadPhotos", "CANCELLED")
    with caplog.at_level(logging.INFO):
        future = stub.UploadPhotos.future(messages(), metadata=client.metadata, timeout=30)
        assert sent_first.wait(10)
        time.sleep(0.5)  # the server is reading the stream
        future.cancel()
        try:  # the generator stays blocked: the stream is cancelled, never half-closed
            deadline = time.monotonic() + 10
            while _count("UploadPhotos", "CANCELLED") == before and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            release.set()
    assert _count("UploadPhotos", "CANCELLED") == before + 1, [
        (r.getMessage(), getattr(r, "code", None), getattr(r, "reason", None)) for r in caplog.records]
    assert any("cancelled by the client" in r.getMessage() and r.levelno == logging.INFO
               for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [
        r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert client.get_concept("kite").photo_count == 0


def _answering_count(method: str, code: str) -> float:
    value = REGISTRY.get_sample_value("personalkv_grpc_request_duration_seconds_count",
                                      {"service": "answering", "method": method, "code": code})
    return value or 0.0


def _wait_count(method: str, code: str, above: float, timeout_s: float = 30) -> float:
    deadline = time.monotonic() + timeout_s
    while _answering_count(method, code) <= above and time.monotonic() < deadline:
        time.sleep(0.05)
    return _answering_count(method, code)


def test_cancelled_asks_are_recorded_as_cancelled_not_as_deadline_exceeded(api, caplog):
    """AskStream cancelled after its first delta, and Ask cancelled while it waits for the
    model (held by another Ask): CANCELLED, logged at INFO."""
    from personalkv.api.client import ask_request
    from personalkv.api.v1 import answering_pb2_grpc

    client = api.client("cancelling-asker")
    stub = answering_pb2_grpc.AnsweringServiceStub(grpc.insecure_channel(api.answering_addr))
    request = ask_request("Describe everything you know in great detail.", max_new_tokens=256)
    with caplog.at_level(logging.INFO):
        before = {m: (_answering_count(m, "CANCELLED"), _answering_count(m, "DEADLINE_EXCEEDED"))
                  for m in ("Ask", "AskStream")}
        stream = stub.AskStream(request, metadata=client.metadata, timeout=60)
        next(stream)  # the first delta: generation is under way
        stream.cancel()
        assert _wait_count("AskStream", "CANCELLED", before["AskStream"][0]) == \
            before["AskStream"][0] + 1
        # The model is held by another Ask (its token callback waits), so this Ask is still
        # waiting for the model when it is cancelled, however fast the tiny model decodes.
        inside, release = threading.Event(), threading.Event()

        def hold(_token):
            inside.set()
            assert release.wait(120)

        holder = threading.Thread(target=answering.ask, args=(
            api.services, "holding-asker", "Hello", [], answering.AskOptions(max_new_tokens=2), hold))
        holder.start()
        try:
            assert inside.wait(120)
            future = stub.Ask.future(request, metadata=client.metadata, timeout=60)
            waited = time.monotonic() + 60
            while api.services.answerer.stats()["waiting"] == 0 and time.monotonic() < waited:
                time.sleep(0.005)
            assert api.services.answerer.stats()["waiting"] == 1
            future.cancel()
        finally:
            release.set()
            holder.join(timeout=120)
        assert _wait_count("Ask", "CANCELLED", before["Ask"][0]) == before["Ask"][0] + 1
    for method in ("Ask", "AskStream"):
        assert _answering_count(method, "DEADLINE_EXCEEDED") == before[method][1]
    assert any("cancelled by the client" in r.getMessage() and r.levelno == logging.INFO
               for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
