"""The mining worker: Celery tasks on the ``mining`` queue."""
