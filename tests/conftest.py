"""Root test configuration.

Fixtures that start real services (S3 server, Milvus server, Redis) live in tests/plugins/,
one module per service; each starts its process on free loopback ports and stops it.

The suite runs offline: no test may reach the Hugging Face hub (the library's default allows
downloads, PERSONALKV_MODEL_HF_OFFLINE=false). Set before the plugins import transformers
(huggingface_hub reads it once, on import); subprocesses inherit it.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest_plugins = [
    "tests.plugins.models",
    "tests.plugins.s3",
    "tests.plugins.milvus",
    "tests.plugins.redis",
]
