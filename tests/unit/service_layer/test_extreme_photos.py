"""Photos at the extremes of shape (1x201, 10x2010, 20000x1, 1x1) go through the real path,
upload -> mining -> caching -> Ask, with each adapter kind (tiny Qwen2-VL, LLaVA-OneVision and a
text-only causal LM): every one is accepted, the concept becomes ready, and an Ask with it
answers (issue 20: Qwen2-VL's processor refused an aspect ratio over 200 with a ValueError,
and Ask answered INTERNAL). The adapter pads such a photo to a shape its model takes
(``ModelAdapter.model_image``); its unit checks are in tests/unit/models/test_adapters_cpu.py."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from personalkv.service_layer import answering, concepts
from personalkv.service_layer.answering import AskOptions

EXTREMES = [(1, 201), (10, 2010), (20000, 1), (1, 1)]


def png(size: tuple[int, int], colour=(40, 90, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(params=["qwen2_vl", "llava_onevision", "causal_lm"])
def adapter_svc(request, service_settings, tiny):
    from personalkv.bootstrap import bootstrap

    services = bootstrap(service_settings, adapter=tiny(request.param))
    yield services
    services.close()


def test_extreme_shapes_are_cached_and_answerable(adapter_svc):
    svc = adapter_svc
    concepts.create_concept(svc, "alice", "strip", "Stripey", "poster", "a long thin poster")
    concepts.add_photos(svc, "alice", "strip", [png(size) for size in EXTREMES])
    m = concepts.get_concept(svc, "alice", "strip")
    assert (m.state, m.failure_reason, len(m.photos)) == ("ready", None, len(EXTREMES))
    if svc.adapter.supports_images:
        assert len(m.chunks) > 1  # the profile and patch chunks of these photos
    for size in EXTREMES:
        result = answering.ask(svc, "alice", "What is Stripey?", [png(size)],
                               AskOptions(max_new_tokens=2))
        assert result.answer is not None and result.skipped_chunks == 0, size
