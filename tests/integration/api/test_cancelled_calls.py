"""A client that cancels an upload stream half way: the server logs it as cancelled (INFO, no
traceback) and records CANCELLED, not an ERROR / INTERNAL; nothing of the upload is stored."""

from __future__ import annotations

import logging
import threading
import time

import grpc

from personalkv.api.v1 import ingestion_pb2, ingestion_pb2_grpc
from personalkv.observability import REGISTRY
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
