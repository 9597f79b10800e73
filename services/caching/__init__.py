"""The caching worker: Celery tasks on the ``caching`` queue."""
