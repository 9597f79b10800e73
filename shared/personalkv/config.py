"""Typed settings: the one place where PersonalKV reads environment variables.

Every field maps to ``PERSONALKV_<SECTION>_<FIELD>`` (e.g. ``PERSONALKV_MODEL_DEVICE=cuda``).
Sections are separate classes so each subsystem depends only on what it uses; ``get_settings()``
returns the process-wide instance. The README's configuration table is generated from these
docstrings' field descriptions, so keep them accurate.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class ModelSettings(BaseSettings):
    """Which VLM answers and how it runs."""

    model_config = SettingsConfigDict(env_prefix="PERSONALKV_MODEL_")

    name: str = Field(
        "tiny:qwen2_vl",
        description="HF hub id or local path of the VLM; 'tiny:<kind>' builds a random-weight "
        "offline model (kinds: qwen2_vl, qwen2_5_vl, llava_onevision, causal_lm).",
    )
    device: str = Field("cpu", description="torch device, e.g. 'cpu', 'cuda', 'cuda:1'.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Compute dtype of the model and of the KV chunks it writes."
    )
    chunk_quantization: Literal["none", "int8"] = Field(
        "none", description="Storage quantization of KV chunks (int8: per-channel symmetric)."
    )
    recompute_ratio: float = Field(
        0.0, ge=0.0, le=1.0, description="Default share of placed chunk tokens recomputed per Ask."
    )
    recompute_strategy: Literal["deviation", "first"] = Field(
        "deviation",
        description="Which tokens to recompute: 'deviation' (CacheBlend: largest key deviation "
        "at an early layer) or 'first' (EPIC: the first tokens of each chunk).",
    )


class StorageSettings(BaseSettings):
    """Where photos, KV chunk blobs and concept manifests live (personalkv.storage)."""

    model_config = SettingsConfigDict(env_prefix="PERSONALKV_STORAGE_")

    url: str = Field(
        "file://./var/objects",
        description="Object store URL: 'file:///abs/dir' (or a plain path) for a local "
        "directory, 's3://BUCKET?endpoint=HOST:PORT&secure=false&region=R' for S3/MinIO.",
    )
    access_key: str | None = Field("minioadmin", description="S3 access key (dev default).")
    secret_key: SecretStr | None = Field(
        SecretStr("minioadmin"), description="S3 secret key (dev default); give it by secret."
    )
    region: str = Field("us-east-1", description="S3 region, used when the URL names none.")
    connect_timeout_s: float = Field(
        2.0, gt=0, description="S3 TCP connect timeout; a dead endpoint fails after this."
    )
    read_timeout_s: float = Field(30.0, gt=0, description="S3 read timeout per request.")
    retries: int = Field(2, ge=0, le=10, description="S3 retries on connect errors and 5xx.")


class IndexSettings(BaseSettings):
    """Where retrieval keys live (personalkv.index)."""

    model_config = SettingsConfigDict(env_prefix="PERSONALKV_INDEX_")

    uri: str = Field(
        "./var/index/milvus.db",
        description="A file path opens embedded milvus-lite (one process only; up to ~100k "
        "keys); 'http://HOST:PORT' a Milvus server or cluster.",
    )
    token: str = Field("", description="Milvus token 'user:password' (servers with auth only).")
    collection_prefix: str = Field("pkv", description="Prefix of the index's collection names.")


class RetrievalSettings(BaseSettings):
    """How the retriever embeds and ranks a user's concepts (personalkv.retrieval)."""

    model_config = SettingsConfigDict(env_prefix="PERSONALKV_RETRIEVAL_")

    text_encoder: str = Field(
        "minilm", description="Text encoder name ('minilm': all-MiniLM-L6-v2, offline; "
        "'hashing': weights-free bag of words, tests only)."
    )
    image_encoder: str = Field(
        "global", description="Image encoder name ('global': weights-free colour + gradient "
        "descriptor)."
    )
    weight_text: float = Field(
        1.0, ge=0, le=1, description="Noisy-OR fusion weight of the text-key score."
    )
    weight_image: float = Field(
        1.0, ge=0, le=1, description="Noisy-OR fusion weight of the image-key score."
    )
    weight_name: float = Field(
        0.5, ge=0, description="Fusion bonus when the question names the concept."
    )
    threshold: float = Field(
        0.45, description="Fused score below which a concept is not returned ('none of yours')."
    )
    relative_cut: float = Field(
        0.6, ge=0, le=1, description="Also drop concepts scoring under this share of the best."
    )
    top_k: int = Field(3, ge=1, description="Most concepts returned per question.")
    candidates: int = Field(50, ge=1, description="Keys fetched per modality before fusion.")

class AuthSettings(BaseSettings):
    """Bearer tokens of the gRPC API (personalkv.auth): HMAC-SHA256, one user per token."""

    model_config = SettingsConfigDict(env_prefix="PERSONALKV_AUTH_")

    secret: SecretStr = Field(
        SecretStr("dev-insecure-secret-change-me"),
        description="HMAC key that signs and verifies tokens; give it by secret in production "
        "(at least 32 bytes; the dev default is refused when PERSONALKV_AUTH_REQUIRE_SECRET=1).",
    )
    require_secret: bool = Field(
        False, description="Refuse to start with the dev default secret (set in production)."
    )
    token_ttl_s: int = Field(
        86_400, gt=0, description="Lifetime of tokens minted by `personalkv token` (seconds)."
    )
    leeway_s: int = Field(30, ge=0, description="Clock skew tolerated when checking expiry.")

class ServerSettings(BaseSettings):
    """The gRPC servers (services/ingestion, services/answering) and their metrics/logs."""

    model_config = SettingsConfigDict(env_prefix="PERSONALKV_SERVER_")

    host: str = Field("127.0.0.1", description="Interface the gRPC and metrics ports bind.")
    ingestion_port: int = Field(50051, ge=0, le=65535, description="Ingestion gRPC port.")
    answering_port: int = Field(50052, ge=0, le=65535, description="Answering gRPC port.")
    ingestion_metrics_port: int = Field(
        9451, ge=0, le=65535, description="Prometheus /metrics port of ingestion (0: off)."
    )
    answering_metrics_port: int = Field(
        9452, ge=0, le=65535, description="Prometheus /metrics port of answering (0: off)."
    )
    max_workers: int = Field(8, ge=1, description="Threads serving RPCs per server.")
    max_message_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Largest gRPC message accepted or sent."
    )
    grace_s: float = Field(
        10.0, ge=0, description="On SIGTERM/SIGINT, how long in-flight RPCs may finish."
    )
    log_level: str = Field("INFO", description="Root log level (DEBUG, INFO, WARNING, ...).")
    log_format: Literal["json", "text"] = Field(
        "json", description="'json': one JSON object per line; 'text': human-readable."
    )


class Settings(BaseSettings):
    """All sections together."""

    model: ModelSettings = Field(default_factory=ModelSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    index: IndexSettings = Field(default_factory=IndexSettings)
    retrieval: RetrievalSettings = Field(default_factory=RetrievalSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
