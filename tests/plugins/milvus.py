"""Milvus fixtures (owned by the index work).

  milvus_server      session: one real Milvus 2.3.5 standalone server (PyPI `milvus`) on free
                     loopback ports with its own data dir; stopped with a timeout at the end.
                     Skips when the `stack` extra is not installed. Set PERSONALKV_TEST_MILVUS_URI
                     to use a server that is already running instead.
  memory_key_index   the in-memory reference KeyIndex (personalkv.index.memory)
  lite_key_index     a MilvusKeyIndex on a fresh milvus-lite file in tmp_path
  server_key_index   a MilvusKeyIndex on `milvus_server` with a collection prefix of its own
  key_index          parametrized over ["memory", "lite", "server"]: the same test runs on all; the
                     server only starts when a "server" case actually runs
"""

from __future__ import annotations

import itertools
import os

import pytest

INDEX_BACKENDS = ["memory", "lite", "server"]
_prefixes = itertools.count()


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory) -> str:
    """The URI of a running Milvus server."""
    if os.environ.get("PERSONALKV_TEST_MILVUS_URI"):
        yield os.environ["PERSONALKV_TEST_MILVUS_URI"]
        return
    pytest.importorskip("milvus", reason="the real Milvus server needs the `stack` extra")
    from personalkv.devstack.milvus import start_milvus_server

    # A 50 ms time tick (default 200) makes the tests' Strong reads and first reads after a
    # write wait less; nothing else changes.
    server = start_milvus_server(tmp_path_factory.mktemp("milvus-server"), time_tick_ms=50)
    yield server.uri
    server.stop(timeout_s=7)  # disposable data: kill rather than wait


@pytest.fixture
def memory_key_index():
    from personalkv.index import open_key_index

    index = open_key_index("memory://")
    yield index
    index.close()


@pytest.fixture
def lite_key_index(tmp_path):
    from personalkv.index import open_key_index

    index = open_key_index(str(tmp_path / "index.db"))
    yield index
    index.close()


@pytest.fixture
def server_key_index(milvus_server):
    from personalkv.index import open_key_index

    # A prefix per test: tests share the server but never each other's collections.
    index = open_key_index(milvus_server, prefix=f"t{os.getpid()}_{next(_prefixes)}")
    yield index
    index.drop_all()
    index.close()


@pytest.fixture(params=INDEX_BACKENDS)
def key_index(request):
    return request.getfixturevalue(f"{request.param}_key_index")


# -- synthetic concepts: photos with an object in clutter, manifests with chunks ---------------

FINGERPRINT = "fp-test-model"


def object_look(seed: int):
    """A concept's look: two colours, a shape and a stripe count, fixed by ``seed``."""
    import numpy as np

    rng = np.random.default_rng(10_000 + seed)
    colours = [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(2)]
    return colours, int(rng.integers(0, 2)), int(rng.integers(2, 6))


def scene(look_seed: int | None, scene_seed: int, size=(320, 240)):
    """A photo: cluttered background, and the object of ``look_seed`` (if any) somewhere in it.
    Returns (PIL image, object box or None)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(scene_seed)
    image = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = rng.integers(0, size[0] - 20), rng.integers(0, size[1] - 20)
        w, h = rng.integers(10, 60, 2)
        draw.rectangle([x, y, x + w, y + h], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    if look_seed is None:
        return image, None
    (c1, c2), shape, stripes = object_look(look_seed)
    w, h = int(rng.integers(110, 150)), int(rng.integers(90, 120))
    x, y = int(rng.integers(0, size[0] - w)), int(rng.integers(0, size[1] - h))
    box = (x, y, x + w, y + h)
    [draw.ellipse, draw.rectangle, lambda b, fill: draw.polygon(
        [(b[0], b[3]), ((b[0] + b[2]) // 2, b[1]), (b[2], b[3])], fill=fill)][shape](box, fill=c1)
    for i in range(stripes):
        sx = x + w // 4 + i * (w // 2) // stripes
        draw.rectangle([sx, y + h // 3, sx + max(2, w // (4 * stripes)), y + 2 * h // 3], fill=c2)
    return image, box


def png(image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def build_concept(user_id: str, concept_id: str, name: str, info: str, look_seed: int,
                  n_photos: int = 2, fingerprint: str = FINGERPRINT, category: str = "",
                  size=(320, 240)):
    """A ready manifest and its photos ({photo_id: png bytes}) without any storage: keys follow
    ChunkStore's layout. Identical arguments for two users give identical photos and texts."""
    import hashlib
    import zlib

    from personalkv.chunk_ref import ChunkRef
    from personalkv.ids import user_scoped_digest
    from personalkv.manifest import ConceptManifest, ConceptProfile, PatchRecord, PhotoRecord
    from personalkv.storage.chunk_store import ChunkStore

    photos, patches, blobs = [], [], {}
    for k in range(n_photos):
        image, box = scene(look_seed, zlib.crc32(f"{concept_id}/{look_seed}/{k}".encode()), size)
        data = png(image)
        photo_id = user_scoped_digest(user_id, data, domain="photo")
        blobs[photo_id] = data
        photos.append(PhotoRecord(
            photo_id=photo_id, media_type="image/png", width=size[0], height=size[1],
            bytes=len(data), object_key=ChunkStore.photo_key(user_id, concept_id, photo_id,
                                                             "image/png")))
        patches.append(PatchRecord(photo_id=photo_id, box=box, score=1.0))

    def chunk(kind: str, source: str) -> ChunkRef:
        chunk_id = hashlib.sha256(f"{user_id}/{concept_id}/{kind}/{source}".encode()).hexdigest()
        return ChunkRef(chunk_id=chunk_id, kind=kind, token_count=10, position_span=10,
                        object_key=ChunkStore.chunk_key(user_id, concept_id, chunk_id),
                        model_fingerprint=fingerprint, source=source)

    chunks = [chunk("profile_text", "profile")]
    chunks += [chunk("image_patch", str(i)) for i in range(len(patches))]
    manifest = ConceptManifest(
        user_id=user_id, concept_id=concept_id, state="ready",
        profile=ConceptProfile(name=name, category=category, info=info),
        photos=photos, patches=patches, chunks=chunks, model_fingerprint=fingerprint,
    )
    return manifest, blobs


def write_concept(store, user_id: str, concept_id: str, name: str, info: str, look_seed: int,
                  **kwargs):
    """``build_concept``, stored through a ChunkStore (photos, chunk blobs, then the manifest)."""
    manifest, photos = build_concept(user_id, concept_id, name, info, look_seed, **kwargs)
    for data in photos.values():
        store.put_photo(user_id, concept_id, data)
    for chunk in manifest.chunks:
        store.put_chunk(user_id, concept_id, chunk.chunk_id, chunk.object_key.encode())
    return store.write_manifest(manifest)


def local_chunk_store(path):
    from personalkv.storage.chunk_store import ChunkStore
    from personalkv.storage.local import LocalObjectStore

    return ChunkStore(LocalObjectStore(path))
