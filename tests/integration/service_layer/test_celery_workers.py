"""Real Celery workers (``personalkv worker`` subprocesses) on a real redis-server:

* a caching worker killed with SIGKILL mid-task: the task is redelivered to a new worker, the
  concept becomes ready, no chunk is stored twice, nothing is lost;
* an object-store outage during a task: the task retries with backoff and completes once the
  store is back, instead of failing the concept.

The object store is a local directory (or the session's S3 server behind a cuttable proxy) and
the index a milvus-lite file, opened by one worker at a time, then by the test to check.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.tcp_proxy import CuttableProxy

pytestmark = pytest.mark.slow

USER, CONCEPT = "alice", "teapot"
N_PHOTOS, PATCHES = 6, 2


def _photo(k: int) -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (320, 240), (230 - 10 * k, 220, 200))
    draw = ImageDraw.Draw(image)
    draw.ellipse((90 + 5 * k, 50, 230 + 5 * k, 190), fill=(40, 90, 170))
    draw.rectangle((140 + 5 * k, 100, 180 + 5 * k, 140), fill=(200, 30, 30))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def stack_env(tmp_path, redis_server):
    import redis

    db = 7
    broker = redis_server.rsplit("/", 1)[0] + f"/{db}"
    redis.Redis.from_url(broker).flushdb()
    env = {
        "PERSONALKV_STORAGE_URL": f"file://{tmp_path / 'objects'}",
        "PERSONALKV_INDEX_URI": str(tmp_path / "index" / "milvus.db"),
        "PERSONALKV_CELERY_BROKER_URL": broker,
        "PERSONALKV_CELERY_VISIBILITY_TIMEOUT_S": "3",
        # A short lease: a redelivered task waits until the killed worker's lease runs out.
        # Recovery at the default lease (90 s) is measured in test_recovery.py.
        "PERSONALKV_CELERY_LEASE_S": "10",
        "PERSONALKV_MODEL_NAME": "tiny:qwen2_vl",
        "PERSONALKV_RETRIEVAL_TEXT_ENCODER": "hashing",
        "PERSONALKV_SERVICE_PATCHES_PER_PHOTO": str(PATCHES),
    }
    (tmp_path / "objects").mkdir()
    return env


def _settings(env):
    from personalkv.config import Settings

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return Settings()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _start_worker(env, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "services.cli", "worker", "--queue", "mining,caching",
         "--concurrency", "1", "--loglevel", "INFO"],
        env={**os.environ, **env}, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stop(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _chunk_files(objects: Path) -> dict[str, tuple[int, int]]:
    folder = objects / "users" / USER / "concepts" / CONCEPT / "chunks"
    if not folder.exists():
        return {}
    return {p.stem: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("*.kv")}


def kill_worker_mid_caching(svc, env, objects: Path, log: Path, timeout_s: float = 180) -> dict:
    """Start a worker on the concept's enqueued work and SIGKILL its whole process group (the
    worker and its pool child, at once) when caching has stored some but not all chunks;
    returns the chunk files there at the kill."""
    from personalkv.service_layer import concepts

    first = _start_worker(env, log)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            files = _chunk_files(objects)
            mined = concepts.get_concept(svc, USER, CONCEPT)
            if mined.state == "caching" and 1 <= len(files) < 1 + len(mined.patches):
                os.killpg(first.pid, signal.SIGKILL)
                first.wait(timeout=10)
                return _chunk_files(objects)
            assert first.poll() is None, log.read_text()[-3000:]
            time.sleep(0.01)
        pytest.fail("caching never started:\n" + log.read_text()[-3000:])
    finally:
        _stop(first, signal.SIGKILL)


def test_sigkill_mid_caching_is_redelivered_and_completes(stack_env, tmp_path):
    from personalkv.service_layer import concepts
    from personalkv.bootstrap import bootstrap

    settings = _settings(stack_env)
    svc = bootstrap(settings)  # Celery queue on the test's redis; index unused
    concepts.create_concept(svc, USER, CONCEPT, "Teapot", "kitchen", "blue teapot, red square")
    concepts.add_photos(svc, USER, CONCEPT, [_photo(k) for k in range(N_PHOTOS)])
    objects = tmp_path / "objects"
    log = tmp_path / "worker.log"

    before = kill_worker_mid_caching(svc, stack_env, objects, log)
    killed_state = concepts.get_concept(svc, USER, CONCEPT)
    assert killed_state.state == "caching", killed_state.state
    expected_chunks = 1 + len(killed_state.patches)
    assert 1 <= len(before) < expected_chunks

    second = _start_worker(stack_env, log)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            manifest = concepts.get_concept(svc, USER, CONCEPT)
            if manifest.state in ("ready", "failed"):
                break
            assert second.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
    finally:
        _stop(second)  # releases the milvus-lite file
    assert manifest.state == "ready", (manifest.failure_reason, log.read_text()[-3000:])

    # Nothing lost: every photo, a patch set per photo, a chunk per patch plus the profile.
    assert len(manifest.photos) == N_PHOTOS
    assert {p.photo_id for p in manifest.patches} == {p.photo_id for p in manifest.photos}
    ids = [c.chunk_id for c in manifest.chunks]
    assert len(ids) == len(set(ids)) == 1 + len({(p.photo_id, p.box) for p in manifest.patches})
    after = _chunk_files(objects)
    assert set(after) == set(ids)  # no orphan, no missing blob
    # No chunk stored twice: those written before the kill were not rewritten.
    for chunk_id, stamp in before.items():
        assert after[chunk_id] == stamp, f"chunk {chunk_id[:12]} was rewritten"

    # Findable: the index holds one key per chunk, and the retriever returns the concept.
    svc.close()
    check = bootstrap(settings)
    try:
        space = check.keys.text_space, check.keys.image_space
        fingerprint = manifest.model_fingerprint
        hits = [h for s in space for h in check.index.entries_of(s, USER, fingerprint, [CONCEPT])]
        with_chunks = [h.chunk.chunk_id for h in hits if h.chunk]
        assert sorted(with_chunks) == sorted(ids)
        result = check.retriever.retrieve(USER, "my teapot", _photo(0), model_fingerprint=fingerprint)
        assert [c.concept_id for c in result.concepts] == [CONCEPT]
    finally:
        check.close()


def test_object_store_outage_is_retried_with_backoff_then_completes(stack_env, tmp_path, s3_server):
    """The worker meets an S3 outage: the task retries (Unavailable, exponential backoff)
    instead of failing the concept, and completes once S3 is back."""
    from personalkv.service_layer import concepts
    from personalkv.bootstrap import bootstrap

    proxy = CuttableProxy(s3_server.port)
    bucket = f"retry-{os.getpid()}-{int(time.time() * 1000) % 100000}"
    env = dict(stack_env, PERSONALKV_STORAGE_URL=(
        f"s3://{bucket}?endpoint=127.0.0.1:{proxy.port}&secure=false"),
        PERSONALKV_STORAGE_ACCESS_KEY=s3_server.access_key,
        PERSONALKV_STORAGE_SECRET_KEY=s3_server.secret_key,
        PERSONALKV_STORAGE_RETRIES="0", PERSONALKV_STORAGE_CONNECT_TIMEOUT_S="0.5",
        PERSONALKV_CELERY_MAX_RETRIES="20", PERSONALKV_CELERY_RETRY_BACKOFF_MAX_S="2")
    settings = _settings(env)
    svc = bootstrap(settings)
    concepts.create_concept(svc, USER, CONCEPT, "Teapot", "kitchen", "blue teapot")
    concepts.add_photos(svc, USER, CONCEPT, [_photo(k) for k in range(2)])  # mining enqueued
    proxy.cut()
    log = tmp_path / "worker.log"
    worker = _start_worker(env, log)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and log.read_text().count("Retry in") < 2:
            assert worker.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        assert log.read_text().count("Retry in") >= 2, log.read_text()[-3000:]
        proxy.restore()
        while time.monotonic() < deadline:
            manifest = concepts.get_concept(svc, USER, CONCEPT)
            if manifest.state in ("ready", "failed"):
                break
            time.sleep(0.2)
    finally:
        _stop(worker)
        proxy.cut()
    assert manifest.state == "ready", (manifest.state, manifest.failure_reason)
    assert "Unavailable" in log.read_text()


def test_wait_idle_waits_for_the_workers_and_recache_stack_returns_when_done(
        stack_env, tmp_path, monkeypatch, capsys):
    """CeleryTaskQueue.wait_idle on a real broker: with no worker the concept's mining task
    stays pending (not idle); with a worker it returns only once mining and the caching it
    enqueued are done (the concept is ready at that moment, no polling). `personalkv recache
    --stack` (the chart's hook Job) then returns after its caching tasks ran."""
    from personalkv import cli
    from personalkv.config import get_settings
    from personalkv.service_layer import concepts
    from personalkv.bootstrap import bootstrap

    svc = bootstrap(_settings(stack_env))
    try:
        concepts.create_concept(svc, USER, CONCEPT, "Teapot", "kitchen", "blue teapot")
        concepts.add_photos(svc, USER, CONCEPT, [_photo(k) for k in range(2)])
        assert svc.task_queue.pending() == 1  # the mining task, waiting for a worker
        assert svc.task_queue.wait_idle(timeout_s=1.5) is False
        worker = _start_worker(stack_env, tmp_path / "worker.log")
        try:
            assert svc.task_queue.wait_idle(timeout_s=300), (tmp_path / "worker.log").read_text()[-3000:]
            assert concepts.get_concept(svc, USER, CONCEPT).state == "ready"
            for name, value in stack_env.items():
                monkeypatch.setenv(name, value)
            get_settings.cache_clear()
            assert cli.main(["recache", "--stack", "--timeout", "300"]) == 0
            assert "enqueued caching for 1 concepts; done" in capsys.readouterr().out
            assert svc.task_queue.pending() == 0
        finally:
            _stop(worker)
            get_settings.cache_clear()
        # No worker: the hook Job's command gives up after --timeout, exit 1.
        assert cli.main(["recache", "--stack", "--timeout", "1"]) == 1
        assert "still busy after 1s" in capsys.readouterr().out
    finally:
        svc.close()
