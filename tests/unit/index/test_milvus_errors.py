"""The Milvus adapter says itself whether an error is transient (retry) or permanent (report).

Why: the service layer used to treat pymilvus' base ``MilvusException`` as an outage, so a
permanent error (a collection with another schema, a bad request) was retried as UNAVAILABLE
for minutes. Now the adapter translates, and ``dependencies()`` retries only the transient kind.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from pymilvus import DataType, MilvusClient
from pymilvus.exceptions import (
    DataNotMatchException, MilvusException, MilvusUnavailableException, ParamError,
)

from personalkv.index import (
    IndexEntry, IndexRequestError, IndexUnavailable, KeysNotVisible, VectorSpace, open_key_index,
)
from personalkv.index.milvus import is_transient
from personalkv.service_layer._common import dependencies
from personalkv.errors import Unavailable

SPACE = VectorSpace("errors", 8)


@pytest.mark.parametrize("exc, transient", [
    (MilvusUnavailableException(message="down"), True),
    (MilvusException(code=grpc.StatusCode.UNAVAILABLE, message="retry run out"), True),
    (MilvusException(code=grpc.StatusCode.DEADLINE_EXCEEDED, message="slow"), True),
    (MilvusException(code=2, message="Fail connecting to server"), True),
    (MilvusException(code=grpc.StatusCode.INVALID_ARGUMENT, message="bad"), False),
    (MilvusException(code=1100, message="invalid parameter"), False),
    (ParamError(message="dim mismatch"), False),
    (DataNotMatchException(message="field missing"), False),
    (KeysNotVisible("lagging"), True),
    (ConnectionResetError("reset"), True),
    (RuntimeError("bug"), False),
])
def test_classification(exc, transient):
    assert is_transient(exc) is transient


def test_classification_follows_the_cause_chain():
    try:
        try:
            raise ConnectionRefusedError("refused")
        except ConnectionRefusedError as inner:
            raise MilvusException(message="Unexpected error, message=<refused>") from inner
    except MilvusException as outer:
        assert is_transient(outer)


def test_an_unreachable_server_is_unavailable_and_retried():
    with pytest.raises(IndexUnavailable, match="Milvus server"):
        open_key_index("http://127.0.0.1:1")
    with pytest.raises(Unavailable):
        with dependencies("the retrieval index"):
            open_key_index("http://127.0.0.1:1")


def test_a_collection_with_another_schema_is_a_permanent_error(tmp_path):
    index = open_key_index(str(tmp_path / "i.db"))
    try:
        # Someone created the space's collection with a schema that lacks our fields.
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("key_id", DataType.VARCHAR, is_primary=True, max_length=64)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=SPACE.dim)
        index.client.create_collection(index.collection(SPACE), schema=schema)
        entry = IndexEntry(key_id="k", user_id="u", concept_id="c", kind="image_patch",
                           model_fingerprint="fp", vector=np.ones(SPACE.dim, np.float32))
        with pytest.raises(IndexRequestError, match="upsert") as caught:
            index.upsert(SPACE, [entry])
        assert not isinstance(caught.value, IndexUnavailable)
        # ... and the service layer does not turn it into a retryable outage.
        with pytest.raises(IndexRequestError):
            with dependencies("the retrieval index"):
                index.upsert(SPACE, [entry])
    finally:
        index.close()
