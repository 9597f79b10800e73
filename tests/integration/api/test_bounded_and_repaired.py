"""Two of issue 30's failures, reproduced through gRPC (the embedded api servers, tiny Qwen2-VL):

* **One photo cannot take the server down for everyone**: Asks with a 20000x1 and a 1x20000
  photo end (answered, or INVALID_ARGUMENT) within their deadline, while another user's photo
  Asks, sent meanwhile, are answered. (On this machine the extreme photos take under a second
  each; the 20 s deadline leaves the 3-4x margin of a loaded machine over the issue's 5 s.)
* **Damaged evidence is repaired on sight**: a chunk tampered in the store is skipped by the
  next Ask (its concept not listed as used, nothing else changes), its concept's repair is
  enqueued at once, and a later Ask places the repaired chunk again.
"""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from PIL import Image

from tests.integration.api.conftest import png

DEADLINE_S = 20.0


def _strip(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (40, 90, 200)).save(buf, "PNG")
    return buf.getvalue()


def test_extreme_photos_end_in_time_while_another_users_photo_asks_answer(api):
    with api.client("xena") as ivy, api.client("yuri") as jon:
        for client, concept, seed in ((ivy, "kite", 50), (jon, "lamp", 51)):
            client.create_concept(concept, concept.title(), "thing", f"my {concept}")
            client.upload_photos(concept, [png(seed)])
            client.wait_ready(concept, timeout_s=120)

        def extreme(size):
            try:
                ivy.ask("What is this?", [_strip(size)], max_new_tokens=2, timeout_s=DEADLINE_S)
            except grpc.RpcError as err:
                return err.code()
            return grpc.StatusCode.OK

        def normal(k):
            return jon.ask("Is this my lamp?", [png(51)], max_new_tokens=2, timeout_s=DEADLINE_S * 3)

        with ThreadPoolExecutor(4) as pool:
            extremes = [pool.submit(extreme, size) for size in ((20000, 1), (1, 20000))]
            others = [pool.submit(normal, k) for k in range(2)]
            for future in extremes:
                code = future.result()
                assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), code
            for future in others:
                assert "lamp" in {c.concept_id for c in future.result().concepts}


def test_a_tampered_chunk_is_skipped_then_repaired_on_sight(api):
    from personalkv.service_layer import evidence

    svc = api.services
    with api.client("zora") as kim:
        kim.create_concept("mug", "Bobo", "mug", "my Bobo mug")
        kim.upload_photos("mug", [png(60), png(61)])
        kim.wait_ready("mug", timeout_s=120)
        before = kim.ask("Where is Bobo?", max_new_tokens=2)
        placed = [c.chunk_id for c in before.chunks if c.concept_id == "mug"]
        assert placed
        manifest = svc.store.read_manifest("zora", "mug")
        ref = next(r for r in manifest.chunks if r.chunk_id == placed[0])
        good = svc.store.objects.get(ref.object_key)
        damaged = bytearray(good)
        damaged[-3] ^= 0x10
        svc.store.objects.put(ref.object_key, bytes(damaged))
        svc.chunk_cache.invalidate("zora")
        evidence._reported.clear()  # chunk ids repeat across tests (same photos)

        skipped = kim.ask("Where is Bobo?", max_new_tokens=2)
        assert placed[0] not in {c.chunk_id for c in skipped.chunks}
        deadline = time.monotonic() + 120  # the repair runs on the in-process task queue
        while svc.store.objects.get(ref.object_key) == bytes(damaged) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert evidence.damaged_chunks(svc, svc.store.read_manifest("zora", "mug")) == []
        svc.chunk_cache.invalidate("zora")
        after = kim.ask("Where is Bobo?", max_new_tokens=2)
        assert placed[0] in {c.chunk_id for c in after.chunks}
