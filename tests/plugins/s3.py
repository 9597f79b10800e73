"""S3 server fixtures (owned by the storage work)."""
