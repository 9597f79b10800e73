"""End to end through the real multi-process stack.

Processes: redis-server (broker), an S3 server (minio, or moto's server), a Milvus 2.3.5
standalone server, a Celery mining worker and a Celery caching worker (`personalkv worker`),
and the two gRPC servers (`python -m services.<name>.server`), all subprocesses on free
loopback ports; the test talks gRPC only (plus read-only looks at S3, Milvus and /metrics to
check what is stored). Tiny random-weight Qwen2-VL, so it runs on CPU in minutes.

Scenario: create a concept and upload photos over gRPC, wait until ready, Ask without and
with a photo (unary and streaming), add a photo (only its chunks are computed), delete the
user (Ask then uses no personal evidence; S3 and Milvus hold nothing of theirs), SIGTERM the
servers (graceful exit 0). In between, a conversation outlives its answering process: two
identical conversations are started; one's follow-up is answered from the kept KV, the
answering process is SIGKILLed, and the other's follow-up, answered by a fresh process that
rebuilds the KV from the stored record, is the same answer.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from personalkv.api.client import PersonalKVClient
from personalkv.api.v1 import common_pb2
from personalkv.auth import mint_token
from personalkv.config import AuthSettings, RetrievalSettings
from personalkv.devstack.s3 import free_port

pytestmark = pytest.mark.slow

USER, CONCEPT = "erin", "bo"
PATCHES = 2
SECRET = "e2e-secret-" + os.urandom(16).hex()
REPO = Path(__file__).resolve().parents[2]


def photo(seed: int, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray((rng.random((120, 160, 3)) * 255).astype("uint8"))
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


class Proc:
    def __init__(self, name: str, argv: list[str], env: dict, logs: Path):
        self.name, self.log = name, logs / f"{name}.log"
        self.popen = subprocess.Popen(
            argv, env=env, cwd=REPO, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def tail(self, n: int = 3000) -> str:
        return f"--- {self.name} ---\n" + self.log.read_text(errors="replace")[-n:]

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)
        return self.popen.returncode


@pytest.fixture
def stack(tmp_path, redis_server, s3_server, milvus_server):
    import redis

    broker = redis_server.rsplit("/", 1)[0] + "/11"
    redis.Redis.from_url(broker).flushdb()
    bucket, prefix = f"e2e-{os.getpid()}", f"e2e{os.getpid()}"
    ports = {k: free_port() for k in ("ing", "ans", "ing_m", "ans_m")}
    env = {
        **os.environ,
        "PERSONALKV_STORAGE_URL": s3_server.store_url(bucket),
        "PERSONALKV_STORAGE_ACCESS_KEY": s3_server.access_key,
        "PERSONALKV_STORAGE_SECRET_KEY": s3_server.secret_key,
        "PERSONALKV_INDEX_URI": milvus_server,
        "PERSONALKV_INDEX_COLLECTION_PREFIX": prefix,
        "PERSONALKV_CELERY_BROKER_URL": broker,
        "PERSONALKV_MODEL_NAME": "tiny:qwen2_vl",
        "PERSONALKV_SERVICE_PATCHES_PER_PHOTO": str(PATCHES),
        "PERSONALKV_AUTH_SECRET": SECRET,
        "PERSONALKV_SERVER_HOST": "127.0.0.1",
        "PERSONALKV_SERVER_INGESTION_PORT": str(ports["ing"]),
        "PERSONALKV_SERVER_ANSWERING_PORT": str(ports["ans"]),
        "PERSONALKV_SERVER_INGESTION_METRICS_PORT": str(ports["ing_m"]),
        "PERSONALKV_SERVER_ANSWERING_METRICS_PORT": str(ports["ans_m"]),
        "PERSONALKV_SERVER_GRACE_S": "5",
        "PERSONALKV_SERVER_LOG_FORMAT": "json",
        "PYTHONUNBUFFERED": "1",
    }
    py = sys.executable
    procs = [
        Proc("mining", [py, "-m", "services.cli", "worker", "--queue", "mining",
                        "--concurrency", "1"], env, tmp_path),
        Proc("caching", [py, "-m", "services.cli", "worker", "--queue", "caching",
                         "--concurrency", "1"], env, tmp_path),
        Proc("ingestion", [py, "-m", "services.ingestion.server"], env, tmp_path),
        Proc("answering", [py, "-m", "services.answering.server"], env, tmp_path),
    ]
    try:
        for port in (ports["ing"], ports["ans"]):
            _wait_serving(f"127.0.0.1:{port}", procs)
        # "started": processes the test starts later go here too, so that they are stopped
        yield {"procs": {p.name: p for p in procs}, "started": procs, "env": env, "ports": ports, "s3": s3_server,
               "bucket": bucket, "milvus": milvus_server, "prefix": prefix}
    except BaseException:
        print("\n".join(p.tail() for p in procs))
        raise
    finally:
        for p in procs:
            p.stop()


def _wait_serving(addr: str, procs, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(addr) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            for p in procs:
                assert p.popen.poll() is None, p.tail()
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.3)
    raise AssertionError(f"{addr} not SERVING after {timeout_s}s")


def _chunk_objects(stack) -> dict[str, object]:
    """Chunk object key -> last-modified time, straight from the S3 server."""
    from minio import Minio

    s3 = stack["s3"]
    client = Minio(s3.endpoint, s3.access_key, s3.secret_key, secure=False, region=s3.region)
    prefix = f"users/{USER}/concepts/{CONCEPT}/chunks/"
    return {o.object_name: o.last_modified
            for o in client.list_objects(stack["bucket"], prefix=prefix, recursive=True)}


def _metrics(port: int) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return opener.open(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def test_full_stack(stack):
    ports, procs = stack["ports"], stack["procs"]
    token = mint_token(USER, settings=AuthSettings(secret=SECRET))
    client = PersonalKVClient(f"127.0.0.1:{ports['ing']}", f"127.0.0.1:{ports['ans']}", token,
                              timeout_s=60)
    try:
        # Upload photos of a new concept (one JPEG, one PNG) and wait until it is ready.
        client.create_concept(CONCEPT, "Bo", "dog", "my corgi; loves the beach and carrots")
        up = client.upload_photos(CONCEPT, [photo(1, "JPEG"), photo(2)], chunk_bytes=8192)
        assert up.photos_received == 2 and up.concept.state == common_pb2.CONCEPT_STATE_QUEUED
        ready = client.wait_ready(CONCEPT, timeout_s=150)
        assert ready.photo_count == 2 and ready.patch_count >= 2
        assert ready.chunk_count == 1 + ready.patch_count  # the profile + one per patch

        # Ask without and with a photo; streaming gives the same kind of answer.
        plain = client.ask("What does Bo love?", max_new_tokens=6)
        assert plain.personal_evidence_used and plain.concepts[0].concept_id == CONCEPT
        assert plain.timings.retrieve_ms > 0 and plain.timings.decode_ms > 0
        with_photo = client.ask("Is this my dog?", [photo(1, "JPEG")], max_new_tokens=6)
        assert with_photo.personal_evidence_used
        assert any(c.kind == common_pb2.CHUNK_KIND_IMAGE_PATCH for c in with_photo.chunks)
        events = list(client.ask_stream("What does Bo love?", max_new_tokens=6))
        assert events[-1].final.personal_evidence_used
        assert "".join(e.text_delta for e in events[:-1]).strip() == events[-1].final.answer

        # Add a photo later: only the new photo's chunks are computed; old ones stay as they are.
        def patch_chunks() -> set[str]:
            used = client.ask("What does Bo love?", max_new_tokens=1).chunks
            return {c.chunk_id for c in used if c.kind == common_pb2.CHUNK_KIND_IMAGE_PATCH}

        before = patch_chunks()
        assert len(before) == ready.patch_count
        stored_before = _chunk_objects(stack)
        time.sleep(1.1)  # S3 modification times have one-second resolution
        client.upload_photos(CONCEPT, [photo(3)])
        again = client.wait_ready(CONCEPT, timeout_s=150)
        assert again.photo_count == 3 and again.patch_count > ready.patch_count
        after = patch_chunks()
        assert before < after and len(after - before) == again.patch_count - ready.patch_count
        stored_after = _chunk_objects(stack)
        assert len(stored_after) == again.chunk_count
        for key, modified in stored_before.items():  # no old chunk was written again
            assert stored_after[key] == modified, key

        text = _metrics(ports["ans_m"])
        assert 'personalkv_grpc_request_duration_seconds_count{code="OK",method="Ask",service="answering"}' in text
        assert 'personalkv_chunk_cache_requests_total{result="hit"}' in text
        assert float(text.split('personalkv_chunk_cache_requests_total{result="hit"} ')[1].split()[0]) > 0
        text = _metrics(ports["ing_m"])
        assert "personalkv_grpc_request_duration_seconds_bucket" in text
        assert 'personalkv_queue_depth{queue="caching"} 0.0' in text

        # A pod killed between turns: the next turn on another process gives the same answer.
        first = "What does Bo love?"
        x = client.ask(first, max_new_tokens=6, start_conversation=True)
        y = client.ask(first, max_new_tokens=6, start_conversation=True)
        assert x.conversation_id and y.conversation_id and x.conversation_id != y.conversation_id
        assert x.answer == y.answer
        followup = "And where does he love to go?"
        kept = client.ask(followup, max_new_tokens=6, conversation_id=x.conversation_id)
        assert kept.timings.rebuild_ms == 0
        procs["answering"].stop(signal.SIGKILL, timeout=10)
        revived = Proc("answering-2", [sys.executable, "-m", "services.answering.server"],
                       stack["env"], procs["answering"].log.parent)
        stack["started"].append(revived)
        procs["answering"] = revived
        _wait_serving(f"127.0.0.1:{ports['ans']}", [revived])
        rebuilt = client.ask(followup, max_new_tokens=6, conversation_id=y.conversation_id)
        assert rebuilt.timings.rebuild_ms > 0  # nothing kept in the new process
        assert rebuilt.answer == kept.answer
        assert [c.chunk_id for c in rebuilt.chunks] == [c.chunk_id for c in kept.chunks]

        # Delete the user: Ask uses no personal evidence; S3 and Milvus hold nothing of theirs.
        assert client.delete_user_data().concepts_deleted == 1
        gone = client.ask("What does Bo love?", max_new_tokens=4)
        assert not gone.personal_evidence_used and not gone.concepts and not gone.chunks
        assert client.list_concepts() == []
        store = stack["s3"].open_store(stack["bucket"])
        assert list(store.list(f"users/{USER}/")) == []
        from personalkv.index import open_key_index
        from personalkv.retrieval.encoders import get_image_encoder, get_text_encoder
        from personalkv.retrieval.keys import KeyBuilder

        index = open_key_index(stack["milvus"], prefix=stack["prefix"])
        keys = KeyBuilder(get_text_encoder("minilm"), get_image_encoder(RetrievalSettings().image_encoder))
        try:
            assert sum(index.count(s, USER) for s in (keys.text_space, keys.image_space)) == 0
        finally:
            index.close()
    finally:
        client.close()

    # Structured logs, then a graceful stop on SIGTERM.
    lines = [ln for ln in procs["ingestion"].log.read_text().splitlines() if ln.startswith("{")]
    assert any(json.loads(ln).get("msg") == "grpc server started" for ln in lines)
    for name in ("ingestion", "answering"):
        assert procs[name].stop(signal.SIGTERM, timeout=20) == 0, procs[name].tail()
    assert "grpc server stopped" in procs["answering"].log.read_text()
