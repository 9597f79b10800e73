"""Every backend registered in the factory implements the whole ObjectStore interface."""

import importlib
import inspect

import pytest

from personalkv.storage.base import ObjectStore

BACKEND_CLASSES = {
    "file": "personalkv.storage.local:LocalObjectStore",
    "s3": "personalkv.storage.s3:S3ObjectStore",
    "memory": "personalkv.storage.memory:InMemoryObjectStore",
}
INTERFACE = ["put", "get", "exists", "delete", "list", "list_children", "delete_prefix", "close",
             "get_versioned", "put_if"]


def load(path: str) -> type:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def test_every_factory_scheme_has_a_backend_under_test():
    from personalkv.storage.factory import BACKENDS

    assert set(BACKENDS) == set(BACKEND_CLASSES)


def test_interface_lists_every_public_method():
    public = {n for n, v in vars(ObjectStore).items() if callable(v) and not n.startswith("_")}
    assert public == set(INTERFACE)


@pytest.mark.parametrize("scheme", sorted(BACKEND_CLASSES))
def test_backend_implements_the_whole_interface(scheme):
    cls = load(BACKEND_CLASSES[scheme])
    assert issubclass(cls, ObjectStore)
    assert not inspect.isabstract(cls), f"abstract left: {cls.__abstractmethods__}"
    for name in INTERFACE:
        base_params = list(inspect.signature(getattr(ObjectStore, name)).parameters)
        params = list(inspect.signature(getattr(cls, name)).parameters)
        assert params == base_params, f"{cls.__name__}.{name}{params} != {base_params}"
