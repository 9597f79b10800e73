"""Root test configuration.

Fixtures that start real services (S3 server, Milvus server, Redis) live in tests/plugins/,
one module per service; each starts its process on free loopback ports and stops it.
"""

pytest_plugins = [
    "tests.plugins.models",
    "tests.plugins.s3",
    "tests.plugins.milvus",
    "tests.plugins.redis",
]
