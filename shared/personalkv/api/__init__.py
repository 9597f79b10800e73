"""The gRPC API of PersonalKV: generated `personalkv.v1` stubs (``personalkv.api.v1``), their
generator (``protogen``), the status mapping of service errors (``errors``) and the
``personalkv serve`` / ``personalkv token`` commands (``cli``)."""
