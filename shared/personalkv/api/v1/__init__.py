"""Generated from protos/personalkv/v1/*.proto by `make proto`; do not edit. Committed, and
checked for freshness by `make proto-check` and tests/unit/api/test_proto_fresh.py."""
