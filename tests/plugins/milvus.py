"""Milvus fixtures (owned by the index work)."""
