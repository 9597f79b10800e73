"""Property: no retrieval ever returns another user's data, even when users share photos and
texts. Checked at the index (raw hits) and at the retriever (concepts and chunks), on both
backends; the index keeps every earlier example's users, so it grows crowded with look-alikes."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from personalkv.index.base import SearchRequest
from personalkv.config import RetrievalSettings
from personalkv.retrieval.encoders import get_image_encoder, get_text_encoder
from personalkv.retrieval.keys import KeyBuilder
from personalkv.retrieval.retriever import Retriever
from tests.plugins.milvus import FINGERPRINT, build_concept, scene

POOL = [  # concept id, name, info, look: every user draws from the same pool
    ("bobo", "Bobo", "my golden retriever with a red collar", 1),
    ("mug", "Blue mug", "my favourite coffee mug", 2),
    ("speedy", "Speedy", "my road bike", 3),
    ("fernie", "Fernie", "the fern on the windowsill", 4),
    ("mimi", "Mimi", "our grey cat", 5),
]
_users = itertools.count()


class _Memo:
    """MiniLM with memory: the pool's few texts are embedded once, not once per example."""

    def __init__(self, encoder):
        self.encoder, self.memo = encoder, {}
        self.name, self.dim = encoder.name, encoder.dim
        self.score_floor, self.score_match = encoder.score_floor, encoder.score_match

    def encode(self, texts):
        import numpy as np

        missing = [t for t in texts if t not in self.memo]
        if missing:
            self.memo.update(zip(missing, self.encoder.encode(missing)))
        return np.stack([self.memo[t] for t in texts]) if texts else self.encoder.encode([])


_MEMO = []


@pytest.fixture
def keys():
    if not _MEMO:
        _MEMO.append(_Memo(get_text_encoder("minilm")))
    return KeyBuilder(_MEMO[0], get_image_encoder("global"))


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_no_retrieval_returns_another_users_data(key_index, keys, data):
    users = [f"user-{next(_users)}" for _ in range(data.draw(st.integers(2, 4), label="users"))]
    chunk_ids: dict[str, set[str]] = {}
    for user in users:
        picks = data.draw(st.lists(st.integers(0, len(POOL) - 1), max_size=3, unique=True))
        chunk_ids[user] = set()
        for i in picks:
            cid, name, info, look = POOL[i]
            manifest, photos = build_concept(user, cid, name, info, look, n_photos=1,
                                             size=(160, 120))
            built = keys.build(manifest, photos.__getitem__)
            key_index.upsert(keys.text_space, built.text)
            key_index.upsert(keys.image_space, built.image)
            chunk_ids[user] |= {c.chunk_id for c in manifest.chunks}
    retriever = Retriever(key_index, keys, RetrievalSettings())
    for _ in range(data.draw(st.integers(1, 3), label="questions")):
        user = data.draw(st.sampled_from(users))
        cid, name, info, look = data.draw(st.sampled_from(POOL))
        question = data.draw(st.sampled_from([f"where is {name}?", info, "what is this?", ""]))
        photo = scene(look, data.draw(st.integers(0, 10**6)), (160, 120))[0] \
            if data.draw(st.booleans()) or not question else None
        # the index itself, not only the retriever's defensive filter
        for space, vector in ((keys.text_space, keys.text_encoder.encode([question or "x"])),
                              (keys.image_space, keys.image_encoder.encode([scene(look, 1)[0]]))):
            hits = key_index.search(SearchRequest(space, user, FINGERPRINT, vector, limit=50))
            assert all(h.user_id == user for h in hits)
            assert {h.chunk.chunk_id for h in hits if h.chunk} <= chunk_ids[user]
        result = retriever.retrieve(user, question, photo, top_k=5, model_fingerprint=FINGERPRINT)
        for chunk in result.chunks():
            assert chunk.chunk_id in chunk_ids[user]
            assert chunk.object_key.startswith(f"users/{user}/")
        if not chunk_ids[user]:
            assert result.none_matched and not result.candidates
