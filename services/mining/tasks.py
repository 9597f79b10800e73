"""Task ``mining.mine_concept`` (queue ``mining``): a one-line wrapper over the service layer."""

from personalkv.service import pipeline
from personalkv.service.celery_app import TASK_OPTIONS, app, worker_services


@app.task(name="mining.mine_concept", **TASK_OPTIONS)
def mine_concept(user_id: str, concept_id: str) -> None:
    pipeline.mine_concept(worker_services(), user_id, concept_id)
