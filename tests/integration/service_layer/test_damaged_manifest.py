"""A really truncated manifest object on the real S3 server concerns its concept alone: the
checks of tests/unit/service_layer/test_damaged_manifest.py (listing, reads, uploads and Asks
of the owner, FAILED with a client-safe reason, DeleteConcept, a reconciler pass that skips it
and finishes another user's refused upload) through the S3 backend."""

from __future__ import annotations

import pytest

from tests.unit.service_layer.conftest import drawn_photo
from tests.unit.service_layer.test_damaged_manifest import check_isolation


@pytest.fixture
def s3_services(s3_server, tmp_path, tiny, request):
    from personalkv.bootstrap import bootstrap
    from personalkv.config import (
        IndexSettings, MiningSettings, RetrievalSettings, ServiceSettings, Settings,
    )

    settings = Settings(
        storage=s3_server.settings(f"damaged-{id(request)}"),
        index=IndexSettings(uri="memory://"),
        service=ServiceSettings(data_dir=str(tmp_path), patches_per_photo=1, task_queue="inline"),
        retrieval=RetrievalSettings(text_encoder="hashing", image_encoder="global"),
        mining=MiningSettings(embedder="colour", profile_from_vlm=False, user_negatives=0),
    )
    svc = bootstrap(settings, adapter=tiny("qwen2_vl"))
    yield svc
    svc.close()


def test_a_truncated_manifest_on_s3_concerns_its_concept_alone(s3_services, caplog):
    check_isolation(s3_services, drawn_photo, caplog)
