"""Entry points of PersonalKV: gRPC servers (ingestion, answering) and workers; thin layers over personalkv.service_layer."""
