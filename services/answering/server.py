"""Answering gRPC server: protobuf <-> personalkv.service_layer.answering, nothing more.

    python -m services.answering.server [--port P] [--metrics-port M] [--embedded]
    personalkv serve answering ...

Retrieval, the hot-chunk LRU, placement and generation live in the service layer. Both RPCs
check the call between generated tokens (Ask through the service's token callback, AskStream
between deltas), so a cancelled call or a passed deadline stops generation instead of
finishing an answer nobody will read. Every answered Ask is reported to the serving metrics
(``observability.SERVING.answered``), whichever answer scheduler ran it.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import fields

from personalkv.api.cli import add_server_arguments
from personalkv.api.context import caller, client_gone
from personalkv.api.errors import abort_client_gone, grpc_errors
from personalkv.api.server import GrpcServer, serve
from personalkv.api.v1 import answering_pb2, answering_pb2_grpc, common_pb2
from personalkv.observability import SERVING
from personalkv.service_layer import answering, conversations
from personalkv.errors import CallEnded

log = logging.getLogger(__name__)

SERVICE_NAME = answering_pb2.DESCRIPTOR.services_by_name["AnsweringService"].full_name
_OPTION_FIELDS = ("top_k", "recompute_ratio", "max_new_tokens", "temperature", "top_p", "seed")
_KINDS = {"profile_text": common_pb2.CHUNK_KIND_PROFILE_TEXT,
          "image_patch": common_pb2.CHUNK_KIND_IMAGE_PATCH}


def options_from_proto(options: answering_pb2.AskOptions):
    """AskOptions with the fields the client set; unset ones keep the service defaults."""
    return answering.AskOptions(
        **{name: getattr(options, name) for name in _OPTION_FIELDS if options.HasField(name)}
    )


def timings_to_proto(timings: answering.Timings) -> answering_pb2.Timings:
    """The service's seconds per stage as the API's milliseconds (``total_ms``: their sum)."""
    stages = {f.name: 1000.0 * getattr(timings, f.name) for f in fields(timings)}
    return answering_pb2.Timings(**{f"{name}_ms": ms for name, ms in stages.items()},
                                 total_ms=1000.0 * timings.total)


def result_to_proto(result: answering.AskResult) -> answering_pb2.AskResponse:
    return answering_pb2.AskResponse(
        answer=result.answer,
        concepts=[answering_pb2.UsedConcept(concept_id=c.concept_id, score=float(c.score))
                  for c in result.concepts],
        chunks=[
            answering_pb2.UsedChunk(chunk_id=c.chunk_id, concept_id=c.concept_id,
                                    score=float(c.score), from_earlier_turn=c.from_earlier_turn,
                                    kind=_KINDS.get(c.kind, common_pb2.CHUNK_KIND_UNSPECIFIED))
            for c in result.chunks
        ],
        timings=timings_to_proto(result.timings),
        personal_evidence_used=bool(result.personal_evidence_used),
        conversation_id=result.conversation_id or "",
    )  # fmt: skip


def conversation_to_proto(record) -> answering_pb2.Conversation:
    ms = lambda t: int(t.timestamp() * 1000)  # noqa: E731
    return answering_pb2.Conversation(
        conversation_id=record.conversation_id, turns=len(record.turns),
        concept_ids=record.concept_ids, kv_tokens=record.kv_tokens,
        created_unix_ms=ms(record.created_at), updated_unix_ms=ms(record.updated_at),
        first_question=record.turns[0].question if record.turns else "",
    )


def _conversation_kw(request) -> dict:
    return {"conversation_id": request.conversation_id or None,
            "start_conversation": request.start_conversation}


def _call_limits(context) -> answering.CallLimits:
    """The call's deadline and liveness, for the model scheduler's queue."""
    remaining = context.time_remaining()
    return answering.CallLimits(
        deadline=None if remaining is None else time.monotonic() + remaining,
        cancelled=lambda: client_gone(context))


class _CallGone(Exception):
    """Raised from the token callback to stop generation for a call nobody waits for."""


class AnsweringServicer(answering_pb2_grpc.AnsweringServiceServicer):
    def __init__(self, services) -> None:
        self.svc = services

    def _events(self, request, context):
        """The service's stream: str deltas, then the final AskResult; stops when the call
        is cancelled or past its deadline (closing the generator stops generation)."""
        user_id = caller(request.user_id)
        if client_gone(context):
            abort_client_gone(context, "AnsweringServicer.AskStream")
        stream = answering.ask_stream(
            self.svc, user_id, request.question, [p.data for p in request.photos],
            options_from_proto(request.options), **_conversation_kw(request),
            call=_call_limits(context),
        )  # fmt: skip
        try:
            for item in stream:
                if client_gone(context):
                    abort_client_gone(context, "AnsweringServicer.AskStream")
                yield item
        finally:
            stream.close()

    @grpc_errors
    def Ask(self, request, context):
        user_id = caller(request.user_id)
        if client_gone(context):
            abort_client_gone(context, "AnsweringServicer.Ask")

        def on_token(_token_id: int) -> None:  # between tokens: stop when nobody waits
            if client_gone(context):
                raise _CallGone()

        try:
            result = answering.ask(
                self.svc, user_id, request.question, [p.data for p in request.photos],
                options_from_proto(request.options), on_token=on_token,
                **_conversation_kw(request), call=_call_limits(context),
            )  # fmt: skip
        except (_CallGone, CallEnded):
            abort_client_gone(context, "AnsweringServicer.Ask")
        SERVING.answered(result)
        return result_to_proto(result)

    @grpc_errors
    def AskStream(self, request, context):
        streamed = ""
        for item in self._events(request, context):
            if isinstance(item, str):
                if item:
                    streamed += item
                    yield answering_pb2.AskStreamResponse(text_delta=item)
                continue
            SERVING.answered(item)
            # Text the token stream held back (a trailing partial character): send it, so the
            # deltas always add up to the final answer (up to surrounding whitespace).
            sent = streamed.strip()
            if item.answer.startswith(sent) and len(item.answer) > len(sent):
                yield answering_pb2.AskStreamResponse(text_delta=item.answer[len(sent):])
            yield answering_pb2.AskStreamResponse(final=result_to_proto(item))

    @grpc_errors
    def ListConversations(self, request, context):
        records = conversations.list_conversations(self.svc, caller(request.user_id))
        return answering_pb2.ListConversationsResponse(
            conversations=[conversation_to_proto(r) for r in records])

    @grpc_errors
    def EndConversation(self, request, context):
        existed = conversations.end_conversation(self.svc, caller(request.user_id),
                                                 request.conversation_id)
        return answering_pb2.EndConversationResponse(existed=existed)


#: seconds an Ask may spend before the engine (retrieval, recognition, loading chunks), added to
#: answer_max_wait_s for the aged-connection grace
RETRIEVAL_ALLOWANCE_S = 60.0


def build_server(services, *, port: int, metrics_port: int = 0, settings=None,
                 auth=None) -> GrpcServer:
    """The answering GrpcServer over a bootstrapped `Services` (not started); server and auth
    settings default to those the services were bootstrapped with."""
    settings = settings or services.settings.server
    auth = auth or services.settings.auth
    servicer = AnsweringServicer(services)
    limits = services.settings.service
    # With the batched scheduler an Ask's thread mostly waits for the model: every Ask the
    # scheduler may hold (queued or answered) gets a thread, so that the one after them is
    # refused at once (RESOURCE_EXHAUSTED) rather than left waiting for a thread.
    workers = settings.max_workers + (limits.answer_queue_size + limits.answer_max_batch
                                      if limits.answer_scheduler == "batched" else 0)
    return GrpcServer(
        "answering",
        lambda server: answering_pb2_grpc.add_AnsweringServiceServicer_to_server(servicer, server),
        [SERVICE_NAME], port=port, metrics_port=metrics_port, settings=settings, auth=auth,
        max_workers=workers, ready=lambda: services.answerer.healthy(),
        # the engine ends every Ask within answer_max_wait_s; retrieval and recognition first
        longest_call_s=limits.answer_max_wait_s + RETRIEVAL_ALLOWANCE_S,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from personalkv.config import get_settings
    from personalkv.observability import setup_logging
    from personalkv.bootstrap import bootstrap

    settings = get_settings().embedded() if args.embedded else get_settings()
    setup_logging("answering", settings.server)
    services = bootstrap(settings)
    from personalkv.observability import watch_chunk_cache

    watch_chunk_cache(services.chunk_cache)
    if not args.no_warmup:  # readiness means ready: health turns SERVING after the warm-up
        answering.warm_up(services)
    server = build_server(
        services,
        port=settings.server.answering_port if args.port is None else args.port,
        metrics_port=(settings.server.answering_metrics_port if args.metrics_port is None
                      else args.metrics_port),
    )  # fmt: skip
    return serve("answering", server, services, settings.server.host)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.answering.server")
    add_server_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
