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
"""

__version__ = "0.1.0"
