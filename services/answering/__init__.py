"""Answering gRPC server: Ask and AskStream."""
