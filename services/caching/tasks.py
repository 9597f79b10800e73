"""Task ``caching.cache_concept`` (queue ``caching``): a one-line wrapper over the service layer."""

from personalkv.service import pipeline
from personalkv.service.celery_app import TASK_OPTIONS, app, worker_services


@app.task(name="caching.cache_concept", **TASK_OPTIONS)
def cache_concept(user_id: str, concept_id: str) -> None:
    pipeline.cache_concept(worker_services(), user_id, concept_id)
