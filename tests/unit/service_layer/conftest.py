"""Service fixtures: an embedded ``Services`` on a temp dir (local store, the in-memory key
index, the session's tiny Qwen2-VL, synchronous in-process tasks, and the weights-free text
encoder, image encoder and patch embedder).

The encoders and the patch embedder are the weights-free ones because these tests are about the
use cases: with EfficientNet every photo cost seconds of CNN windows. The shipped defaults run
through the same use cases in tests/integration (Celery workers, the gRPC API) and the
EfficientNet backends in tests/unit/mining (slow).

The index is ``memory://`` because these tests are about the use cases, not Milvus: the
in-memory index passes the same contract tests as milvus-lite and the Milvus server
(tests/unit/index/test_index_contract.py), and the use cases over milvus-lite and the server
run in tests/integration/service_layer. The object store stays a local directory: some tests check
that files are not rewritten (mtimes), and it costs nothing.
"""

from __future__ import annotations

import io

import pytest
from PIL import Image, ImageDraw


@pytest.fixture
def service_settings(tmp_path):
    from personalkv.config import (
        IndexSettings, MiningSettings, RetrievalSettings, ServiceSettings, Settings,
        StorageSettings,
    )

    objects = tmp_path / "data" / "objects"
    objects.mkdir(parents=True)
    return Settings(service=ServiceSettings(data_dir=str(tmp_path / "data"), patches_per_photo=2,
                                            task_queue="inline"),
                    retrieval=RetrievalSettings(text_encoder="hashing", image_encoder="global"),
                    mining=MiningSettings(embedder="colour"),
                    storage=StorageSettings(url=f"file://{objects}"),
                    index=IndexSettings(uri="memory://"))


@pytest.fixture
def svc(service_settings, tiny):
    from personalkv.bootstrap import bootstrap

    # Not settings.embedded(): that opens milvus-lite under data_dir; these settings name the
    # parts themselves (local store, memory:// index, inline in-process tasks).
    services = bootstrap(service_settings, adapter=tiny("qwen2_vl"))
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
