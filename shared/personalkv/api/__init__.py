"""The gRPC edge of PersonalKV, all of it; the entry points in ``services/`` only wire it up.

- ``v1``: the generated `personalkv.v1` stubs; ``protogen`` generates them.
- ``server``: ``GrpcServer`` (interceptors, health, reflection, TLS, connection lifetime) and
  ``serve()``, used by ``services/ingestion/server.py`` and ``services/answering/server.py``.
- ``interceptors``: authentication and metrics, installed by ``server``.
- ``context``: what a servicer asks of its call: ``caller()``, ``client_gone()``.
- ``errors``: the one mapping of service errors to gRPC status codes (``grpc_errors``).
- ``health``: the health probe, ``python -m personalkv.api.health`` (Docker, Compose, helm test).
- ``client``: the Python client; ``cli``: ``personalkv token`` and the ``personalkv serve``
  options.
"""
