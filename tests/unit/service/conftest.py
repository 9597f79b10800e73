"""Service fixtures: an embedded ``Services`` on a temp dir (local store, milvus-lite, the
session's tiny Qwen2-VL, synchronous in-process tasks, the weights-free text encoder)."""

from __future__ import annotations

import io

import pytest
from PIL import Image, ImageDraw


@pytest.fixture
def service_settings(tmp_path):
    from personalkv.config import RetrievalSettings, ServiceSettings, Settings

    return Settings(service=ServiceSettings(data_dir=str(tmp_path / "data"), patches_per_photo=2),
                    retrieval=RetrievalSettings(text_encoder="hashing"))


@pytest.fixture
def svc(service_settings, tiny):
    from personalkv.service.bootstrap import bootstrap

    services = bootstrap(service_settings, embedded=True, adapter=tiny("qwen2_vl"),
                         synchronous_tasks=True)
    yield services
    services.close()


def drawn_photo(colour, seed: int = 0, size=(160, 128), fmt="PNG") -> bytes:
    image = Image.new("RGB", size, (225, 225, 220))
    draw = ImageDraw.Draw(image)
    x = 20 + 7 * (seed % 5)
    draw.ellipse((x, 20, x + 100, 110), fill=colour)
    draw.rectangle((x + 35, 50, x + 60, 80), fill=(250, 250, 250))
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def photo_of():
    return drawn_photo
