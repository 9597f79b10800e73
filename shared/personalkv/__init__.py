"""PersonalKV: a personalized VLM assistant that answers over per-user KV-cache chunks.

Subpackages (one idea each):
  config     typed settings from environment variables (the only place env vars are read)
  ids        validation of user / concept ids before they touch a path, key or query
  models     adapters over Hugging Face VLMs / LMs and tiny offline test models
  kv         the KV chunk format, its codec, RoPE position bookkeeping and placement
  engine     the answering engine: scheduler, decode batch, incremental detokenizer
  storage    object storage for photos, manifests and chunk blobs (local dir, S3/MinIO)
  index      retrieval keys in Milvus
  retrieval  encoders and the retriever that ranks a user's concepts for a question
  mining     patch mining, profiles and the photo recognizer
  service_layer  the use cases (ingest, mine, cache, ask, conversations) over those parts
  api        gRPC servers, interceptors, the client and the health probe
  evaluation the evaluation harnesses (recognition, QA, grounded QA, Ask)
  devstack   the local multi-process stack of `make up`
  errors     the errors a caller can act on (each maps to one gRPC status)
  cancellation  cooperative stopping of a request's long CPU work
"""

__version__ = "0.1.0"
