"""The service layer: PersonalKV's use cases, called by every entry point.

Entry points (gRPC servicers in services/ingestion and services/answering, Celery tasks in
services/mining and services/caching, ``personalkv.commands``, ``personalkv.demo``) translate their
messages into calls of these functions and nothing else. Each takes the ``Services`` container
(``services.Services``) that the composition root builds:

  personalkv.bootstrap.bootstrap(settings) -> Services   (settings.embedded(): no servers)
  concepts.create_concept(svc, user_id, concept_id, name, category="", info="") -> ConceptManifest
  concepts.add_photos(svc, user_id, concept_id, photos: list[bytes]) -> ConceptManifest
  concepts.get_concept(svc, user_id, concept_id) -> ConceptManifest
  concepts.list_concepts(svc, user_id) -> list[ConceptManifest]
  concepts.delete_concept(svc, user_id, concept_id) -> bool          (idempotent)
  concepts.delete_user(svc, user_id) -> int                          (idempotent)
  pipeline.mine_concept(svc, user_id, concept_id)                    (task mining.mine_concept)
  pipeline.cache_concept(svc, user_id, concept_id)                   (task caching.cache_concept)
  answering.ask(svc, user_id, question, photos, options: AskOptions) -> AskResult
  answering.ask_stream(...) -> yields str pieces, then the AskResult
  photos.validate_photo(data, *, max_bytes, max_pixels) -> ValidatedPhoto

Ports: ``task_queue.TaskQueue`` (the in-process reference queue is here; the Celery one is
``personalkv.celery_app``), the object store and key index (``personalkv.storage``,
``personalkv.index``). This package imports neither Celery nor argparse (a test keeps it so).

Errors are ``errors.ServiceError`` subclasses (InvalidArgument, AlreadyExists, NotFound,
PermissionDenied, ResourceExhausted, Unavailable), each with a message fit for the caller.
"""
