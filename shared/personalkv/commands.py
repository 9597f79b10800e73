"""The ``personalkv`` commands that drive the use cases (listed in personalkv.cli.COMMAND_MODULES;
``personalkv worker`` is ``services/cli.py``'s).

  ingest DIR --user U --concept C [--name --category --info] [--stack]
                                  create the concept (if new), add DIR's photos, wait for ready
  ask --user U "question" [--photo P] [--stack] [--stream]
      [--start-conversation | --conversation ID]   keep the KV for follow-ups / ask one
  reindex [--user U] [--stack]    rebuild the key index from the manifests
  recache [--user U] [--stack]    re-run caching for every concept (after a model change, or
                                  to repair chunks an Ask refused)
  demo [--data-dir D]             the offline, embedded end-to-end demo (``make demo``)

``--stack`` uses the configured S3 / Milvus server / Celery (``make up``); without it, the
embedded store and index under PERSONALKV_SERVICE_DATA_DIR and in-process tasks.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"}


def register(subparsers) -> None:
    ingest = subparsers.add_parser("ingest", help="add a folder of photos as one concept")
    ingest.add_argument("dir", type=Path, help="folder of photos (jpg, png, webp, gif, bmp)")
    ingest.add_argument("--user", required=True, help="the user the concept belongs to")
    ingest.add_argument("--concept", required=True, help="the concept's id, e.g. rex")
    ingest.add_argument("--name", help="the concept's name (default: the concept id)")
    ingest.add_argument("--category", default="", help="what it is, e.g. dog")
    ingest.add_argument("--info", default="", help="what you know about it, free text")
    ingest.add_argument("--stack", action="store_true", help="use the running stack")
    ingest.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for ready")
    ingest.set_defaults(func=_ingest)

    ask = subparsers.add_parser("ask", help="ask a question about your concepts")
    ask.add_argument("question", help="the question, quoted")
    ask.add_argument("--user", required=True, help="whose concepts to answer from")
    ask.add_argument("--photo", type=Path, help="a photo to ask about")
    ask.add_argument("--max-new-tokens", type=int, default=64, help="longest answer, in tokens")
    ask.add_argument("--top-k", type=int, default=None,
                     help="most concepts placed (default PERSONALKV_RETRIEVAL_TOP_K)")
    ask.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    ask.add_argument("--stack", action="store_true", help="use the running stack")
    talk = ask.add_mutually_exclusive_group()
    talk.add_argument("--start-conversation", action="store_true",
                      help="keep this question's KV and print the conversation id (on stderr)")
    talk.add_argument("--conversation", metavar="ID",
                      help="a follow-up in this conversation (the id --start-conversation printed)")
    ask.set_defaults(func=_ask)

    reindex = subparsers.add_parser("reindex", help="rebuild the retrieval index from manifests")
    reindex.add_argument("--user", action="append", help="only these users (repeatable)")
    reindex.add_argument("--stack", action="store_true", help="use the running stack")
    reindex.set_defaults(func=_reindex)

    recache = subparsers.add_parser(
        "recache", help="enqueue caching for every concept (after a model change, or to "
        "repair refused or missing chunks)")
    recache.add_argument("--user", action="append", help="only these users (repeatable)")
    recache.add_argument("--stack", action="store_true", help="use the running stack")
    recache.add_argument("--timeout", type=float, default=None,
                         help="seconds to wait for the queue to be idle (default: no limit)")
    recache.set_defaults(func=_recache)

    demo = subparsers.add_parser("demo", help="offline end-to-end demo (embedded, one process)")
    demo.add_argument("--data-dir", type=Path, default=None,
                      help="where the demo keeps its store and index (default: a temp dir)")
    demo.add_argument("--model", default=None, help="VLM to try (default PERSONALKV_MODEL_NAME)")
    demo.set_defaults(func=_demo)


def _logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _services(stack: bool):
    from personalkv.config import get_settings  # the command is an entry point
    from personalkv.bootstrap import bootstrap

    settings = get_settings()
    if not stack:
        settings = settings.embedded()
        # Embedded mode writes under the data dir (default ./var): say where, and which model.
        print(f"embedded: data in {Path(settings.service.data_dir).resolve()} "
              f"(PERSONALKV_SERVICE_DATA_DIR), model {settings.model.name} "
              f"(PERSONALKV_MODEL_NAME); --stack for the running stack", file=sys.stderr)
    return bootstrap(settings)


def _ingest(args) -> int:
    from personalkv.progress import wait_ready_with_progress
    from personalkv.service_layer import concepts
    from personalkv.errors import NotFound

    _logging("WARNING")
    if not args.dir.is_dir():
        print(f"personalkv ingest: error: {args.dir} is not a folder", file=sys.stderr)
        return 2
    files = sorted(p for p in args.dir.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
    if not files:
        print(f"personalkv ingest: error: no photos ({', '.join(sorted(PHOTO_SUFFIXES))}) in "
              f"{args.dir}", file=sys.stderr)
        return 2
    svc = _services(args.stack)
    created = False
    try:
        try:
            concepts.get_concept(svc, args.user, args.concept)
        except NotFound:
            concepts.create_concept(svc, args.user, args.concept, args.name or args.concept,
                                    args.category, args.info)
            created = True
        concepts.add_photos(svc, args.user, args.concept, [p.read_bytes() for p in files])
        [manifest] = wait_ready_with_progress(svc, args.user, [args.concept], args.timeout)
    except BaseException:
        if created:  # a failed ingest leaves nothing behind (not a concept stuck QUEUED)
            _delete_quietly(svc, args.user, args.concept)
        raise
    finally:
        svc.close()
    print(f"{args.user}/{args.concept}: {manifest.state}; {len(manifest.photos)} photos, "
          f"{len(manifest.patches)} patches, {len(manifest.chunks)} chunks"
          + (f"; {manifest.failure_reason}" if manifest.failure_reason else ""))
    return 0 if manifest.state == "ready" else 1


def _delete_quietly(svc, user_id: str, concept_id: str) -> None:
    from personalkv.service_layer import concepts

    try:
        concepts.delete_concept(svc, user_id, concept_id)
    except Exception:  # noqa: BLE001 - the ingest's own error is the one to report
        logging.getLogger(__name__).debug("could not delete %s/%s", user_id, concept_id, exc_info=True)


def _ask(args) -> int:
    from personalkv.service_layer import answering
    from personalkv.errors import InvalidArgument

    _logging("WARNING")
    if args.photo is not None and not args.photo.is_file():
        raise InvalidArgument(f"--photo {args.photo} is not a file")
    photos = [args.photo.read_bytes()] if args.photo else []
    svc = _services(args.stack)
    options = answering.AskOptions(top_k=args.top_k, max_new_tokens=args.max_new_tokens)
    talk = {"conversation_id": args.conversation, "start_conversation": args.start_conversation}
    try:
        if args.stream:
            result = None
            for piece in answering.ask_stream(svc, args.user, args.question, photos, options, **talk):
                if isinstance(piece, answering.AskResult):
                    result = piece
                else:
                    print(piece, end="", flush=True)
            print()
        else:
            result = answering.ask(svc, args.user, args.question, photos, options, **talk)
            print(result.answer)
    finally:  # a ServiceError: one line from personalkv.cli.main, with every command's prefix
        svc.close()
    print(result.describe_evidence(), file=sys.stderr)
    if result.conversation_id:
        print(f"  conversation: {result.conversation_id} (follow up with --conversation)",
              file=sys.stderr)
    return 0


def _reindex(args) -> int:
    """``personalkv.retrieval.indexing.reindex`` over the same store and index ``bootstrap`` wires
    (embedded paths under PERSONALKV_SERVICE_DATA_DIR, or the stack's with ``--stack``)."""
    from personalkv.retrieval.indexing import reindex

    svc = _services(args.stack)
    try:
        reindex(svc.store, svc.index, svc.keys, users=args.user)
    finally:
        svc.close()
    return 0


def _recache(args) -> int:
    """Enqueue ``caching.cache_concept`` for every concept: with a new model (fingerprint) every
    chunk is encoded again and the old ones deleted; with the same model every stored chunk is
    verified and only those missing or refused (tampered, corrupt) are encoded again. Then
    wait until the task queue is idle (the workers did it all); exit 1 if ``--timeout`` passed."""
    svc = _services(args.stack)
    count = 0
    try:
        for user_id in args.user or svc.store.list_users():
            for concept_id in svc.store.list_concepts(user_id):
                svc.task_queue.enqueue_caching(user_id, concept_id)
                count += 1
        idle = svc.task_queue.wait_idle(args.timeout)
    finally:
        svc.close()
    print(f"enqueued caching for {count} concepts; "
          + ("done: the task queue is idle" if idle else
             f"the task queue is still busy after {args.timeout:g}s"))
    return 0 if idle else 1


def _demo(args) -> int:
    from personalkv.demo import run_demo

    return run_demo(data_dir=args.data_dir, model_name=args.model)
