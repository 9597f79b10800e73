"""Ingestion gRPC server: protobuf <-> personalkv.service_layer.concepts, nothing more.

    python -m services.ingestion.server [--port P] [--metrics-port M] [--embedded]
    personalkv serve ingestion ...

Photo validation, storage, manifests and enqueueing live in the service layer; this file only
reassembles streamed photos (bounded by the service's byte and count limits, so a client cannot
make the server buffer more than it will ever accept) and translates messages.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from contextlib import contextmanager

from personalkv.api.cli import add_server_arguments
from personalkv.api.context import caller, client_gone
from personalkv.api.errors import abort_client_gone, grpc_errors
from personalkv.api.server import GrpcServer, serve
from personalkv.api.v1 import common_pb2, ingestion_pb2, ingestion_pb2_grpc
from personalkv.manifest import ConceptManifest
from personalkv.service_layer import concepts
from personalkv.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

SERVICE_NAME = ingestion_pb2.DESCRIPTOR.services_by_name["IngestionService"].full_name
_STATES = {
    "queued": common_pb2.CONCEPT_STATE_QUEUED, "mining": common_pb2.CONCEPT_STATE_MINING,
    "caching": common_pb2.CONCEPT_STATE_CACHING, "ready": common_pb2.CONCEPT_STATE_READY,
    "failed": common_pb2.CONCEPT_STATE_FAILED,
}  # fmt: skip


def concept_to_proto(m: ConceptManifest) -> common_pb2.Concept:
    concept = common_pb2.Concept(
        concept_id=m.concept_id,
        facts=common_pb2.ConceptFacts(name=m.profile.name, category=m.profile.category,
                                      info=m.profile.info),
        state=_STATES.get(m.state, common_pb2.CONCEPT_STATE_UNSPECIFIED),
        failure_reason=m.failure_reason or "", photo_count=len(m.photos),
        patch_count=len(m.patches), chunk_count=len(m.chunks), caption=m.profile.caption,
    )  # fmt: skip
    concept.updated_at.FromDatetime(m.updated_at)
    return concept


class IngestionServicer(ingestion_pb2_grpc.IngestionServiceServicer):
    def __init__(self, services, max_workers: int | None = None) -> None:
        self.svc = services
        self.limits = services.settings.service
        self.write_wait_s = services.settings.server.write_wait_s
        # Writes wait on the object store and the broker. Of the server's RPC slots
        # (api.server.rpc_slots: all threads but health's two), writes running or waiting for
        # a slot may hold all but two more, so reads still answer while a dependency hangs;
        # half the threads run writes at once, the others queue briefly (a phone syncing ten
        # photos at once is served, not told to retry).
        workers = max_workers or services.settings.server.max_workers
        self._write_admission = threading.BoundedSemaphore(max(1, workers - 4))
        self._writes = threading.BoundedSemaphore(max(1, min(workers - 4, workers // 2)))

    @contextmanager
    def _write_slot(self, context):
        """A write slot, waited for up to write_wait_s (and half the call's remaining time)."""
        busy = Unavailable("the server is busy with other writes; retry in a moment")
        if not self._write_admission.acquire(blocking=False):
            raise busy
        try:
            remaining = context.time_remaining()
            wait_s = self.write_wait_s if remaining is None else min(self.write_wait_s,
                                                                     remaining / 2)
            if not self._writes.acquire(timeout=max(0.0, wait_s)):
                raise busy
            try:
                yield
            finally:
                self._writes.release()
        finally:
            self._write_admission.release()

    @grpc_errors
    def CreateConcept(self, request, context):
        facts = request.facts
        with self._write_slot(context):
            manifest = concepts.create_concept(
                self.svc, caller(request.user_id), request.concept_id,
                facts.name, facts.category, facts.info,
            )  # fmt: skip
        return concept_to_proto(manifest)

    @grpc_errors
    def UploadPhotos(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("item") != "header":
            raise InvalidArgument("the first UploadPhotos message must be the header")
        user_id = caller(first.header.user_id)
        photos = self._read_photos(request_iterator, context)
        with self._write_slot(context):
            manifest = concepts.add_photos(self.svc, user_id, first.header.concept_id, photos)
        return ingestion_pb2.UploadPhotosResponse(
            concept=concept_to_proto(manifest), photos_received=len(photos)
        )

    def _read_photos(self, request_iterator, context) -> list[bytes]:
        max_bytes, max_count = self.limits.max_photo_bytes, self.limits.max_photos_per_request
        photos: list[bytes] = []
        current = bytearray()
        for message in request_iterator:
            if client_gone(context):
                abort_client_gone(context, "IngestionServicer.UploadPhotos")
            if message.WhichOneof("item") != "chunk":
                raise InvalidArgument("only the first UploadPhotos message may be a header")
            current += message.chunk.data
            if len(current) > max_bytes:
                name = f" {message.chunk.filename!r}" if message.chunk.filename else ""
                raise ResourceExhausted(
                    f"photo {len(photos) + 1}{name} is over {max_bytes} bytes, the size limit"
                )
            if message.chunk.end_of_photo:
                photos.append(bytes(current))
                current.clear()
                if len(photos) > max_count:
                    raise ResourceExhausted(f"more than {max_count} photos in one upload")
        if current and client_gone(context, wait_s=0.5):
            abort_client_gone(context, "IngestionServicer.UploadPhotos")
        if current:
            raise InvalidArgument("the stream ended inside a photo (no chunk with end_of_photo)")
        if not photos:
            raise InvalidArgument("the upload carries no photos")
        return photos

    @grpc_errors
    def GetConcept(self, request, context):
        return concept_to_proto(
            concepts.get_concept(self.svc, caller(request.user_id), request.concept_id)
        )

    @grpc_errors
    def ListConcepts(self, request, context):
        manifests = concepts.list_concepts(self.svc, caller(request.user_id))
        return ingestion_pb2.ListConceptsResponse(
            concepts=[concept_to_proto(m) for m in sorted(manifests, key=lambda m: m.concept_id)]
        )

    @grpc_errors
    def DeleteConcept(self, request, context):
        with self._write_slot(context):
            existed = concepts.delete_concept(self.svc, caller(request.user_id), request.concept_id)
        if not existed and not request.allow_missing:
            raise NotFound(f"concept {request.concept_id!r} does not exist")
        return ingestion_pb2.DeleteConceptResponse()

    @grpc_errors
    def DeleteUserData(self, request, context):
        with self._write_slot(context):
            deleted = concepts.delete_user(self.svc, caller(request.user_id))
        return ingestion_pb2.DeleteUserDataResponse(concepts_deleted=int(deleted or 0))


def build_server(services, *, port: int, metrics_port: int = 0, settings=None,
                 auth=None) -> GrpcServer:
    """The ingestion GrpcServer over a bootstrapped `Services` (not started); server and auth
    settings default to those the services were bootstrapped with."""
    settings = settings or services.settings.server
    auth = auth or services.settings.auth
    servicer = IngestionServicer(services, settings.max_workers)
    return GrpcServer(
        "ingestion",
        lambda server: ingestion_pb2_grpc.add_IngestionServiceServicer_to_server(servicer, server),
        [SERVICE_NAME], port=port, metrics_port=metrics_port, settings=settings, auth=auth,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from personalkv.config import get_settings
    from personalkv.observability import setup_logging
    from personalkv.bootstrap import bootstrap
    from personalkv.service_layer.reconciler import Reconciler

    settings = get_settings().embedded() if args.embedded else get_settings()
    setup_logging("ingestion", settings.server)
    services = bootstrap(settings)
    # Concepts left queued / mining / caching by a dead worker or a failed enqueue: re-enqueued.
    Reconciler(services).start()
    if settings.service.task_queue == "celery":
        from personalkv.observability import track_celery_queues
        from personalkv.service_layer.task_queue import QUEUE_OF

        track_celery_queues(settings.celery.broker_url, sorted(set(QUEUE_OF.values())))
    server = build_server(
        services,
        port=settings.server.ingestion_port if args.port is None else args.port,
        metrics_port=(settings.server.ingestion_metrics_port if args.metrics_port is None
                      else args.metrics_port),
    )  # fmt: skip
    return serve("ingestion", server, services, settings.server.host)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.ingestion.server")
    add_server_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
