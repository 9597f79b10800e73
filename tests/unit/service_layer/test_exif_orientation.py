"""A phone photo stored with EXIF orientation 6 and its physically rotated twin give the same
patches, index keys and retrieval result: every path decodes through personalkv.images."""

from __future__ import annotations

import cv2
import numpy as np

from personalkv.service_layer import answering, concepts
from tests.unit.test_images import exif_jpeg_and_twin


def _scene(seed: int) -> np.ndarray:
    """A textured mark on clutter, 240 wide x 320 high (portrait, as phones shoot)."""
    rng = np.random.default_rng(seed)
    img = np.full((320, 240, 3), rng.integers(80, 180, 3), np.uint8)
    for _ in range(30):
        x, y = (int(v) for v in rng.integers(0, 240, 2))
        cv2.circle(img, (x, y), int(rng.integers(4, 18)), tuple(int(c) for c in rng.integers(0, 256, 3)), -1)
    mark = cv2.resize(np.random.default_rng(99).integers(0, 256, (8, 8, 3)).astype(np.uint8), (96, 96),
                      interpolation=cv2.INTER_NEAREST)
    y, x = 40 + 20 * (seed % 3), 60 + 10 * (seed % 2)
    img[y:y + 96, x:x + 96] = mark
    return img


def test_exif_rotated_photo_and_its_twin_mine_index_and_retrieve_alike(svc):
    pairs = [exif_jpeg_and_twin(_scene(s)) for s in range(2)]
    for user, photos in (("phone", [j for j, _ in pairs]), ("twin", [t for _, t in pairs])):
        concepts.create_concept(svc, user, "toy", "Toy", "toy")
        concepts.add_photos(svc, user, "toy", photos)
    phone, twin = (concepts.get_concept(svc, u, "toy") for u in ("phone", "twin"))
    assert phone.state == twin.state == "ready"
    # same patches and support windows, box for box (photo ids differ: other bytes, other user)
    order = {p.photo_id: i for i, p in enumerate(phone.photos)}
    order.update({p.photo_id: i for i, p in enumerate(twin.photos)})
    for field in ("patches", "support"):
        a = [(order[p.photo_id], p.box) for p in getattr(phone, field)]
        b = [(order[p.photo_id], p.box) for p in getattr(twin, field)]
        assert a == b and a
    # same index keys (image space: photos and patches)
    keys = [svc.keys.build(m, lambda pid, u=u: svc.store.get_photo(u, "toy", pid)).image
            for u, m in (("phone", phone), ("twin", twin))]
    assert len(keys[0]) == len(keys[1])
    for x, y in zip(*keys):
        assert x.kind == y.kind and np.allclose(x.vector, y.vector, atol=1e-5)
    # same retrieval: a new sideways phone photo, and its twin, asked of each user
    ask_jpeg, ask_twin = exif_jpeg_and_twin(_scene(5))
    results = [answering.retrieve(svc, u, "What is this?", [p])
               for u in ("phone", "twin") for p in (ask_jpeg, ask_twin)]
    assert all(r.concepts and r.concepts[0].concept_id == "toy" for r in results)
    scores = [r.concepts[0].score for r in results]
    assert max(scores) - min(scores) < 1e-6
