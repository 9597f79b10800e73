"""Ingestion gRPC server: concepts, photos, deletion."""
