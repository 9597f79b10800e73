"""Task ``caching.cache_concept`` (queue ``caching``): a one-line wrapper over the service layer,
declared on the workers' app by ``services/worker.py``."""

from personalkv.service_layer import pipeline
from personalkv.service_layer.task_queue import TASK_CACHE


def declare(app, options: dict, services):
    """Declare the task on ``app``; ``services()`` is the worker process's ``Services``."""

    @app.task(name=TASK_CACHE, **options)
    def cache_concept(user_id: str, concept_id: str) -> None:
        pipeline.cache_concept(services(), user_id, concept_id)

    return cache_concept
