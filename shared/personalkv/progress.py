"""Progress of ingestion on a terminal: ``personalkv ingest`` and the demo wait for their
concepts with ``wait_ready_with_progress``."""

from __future__ import annotations

import sys
import time

#: A concept goes queued -> mining -> caching -> ready (or failed): the progress bar's steps.
STEPS = ("queued", "mining", "caching", "ready")


def wait_ready_with_progress(svc, user_id: str, concept_ids: list[str], timeout_s: float) -> list:
    """Poll the concepts' manifests until each is ready or failed (or ``timeout_s`` passed) and
    return them, drawing a progress bar on stderr (a step per state a concept passes; only on
    a terminal: logs stay clean). Used by ``personalkv ingest`` and the demo."""
    from tqdm import tqdm

    from personalkv.service_layer import concepts

    deadline = time.monotonic() + timeout_s
    last = len(STEPS) - 1
    with tqdm(total=last * len(concept_ids), unit="step", file=sys.stderr, disable=None,
              bar_format="{desc} {bar} {elapsed}") as bar:
        while True:
            manifests = [concepts.get_concept(svc, user_id, c) for c in concept_ids]
            bar.update(sum(STEPS.index(m.state) if m.state in STEPS else last
                           for m in manifests) - bar.n)
            bar.set_description_str(", ".join(f"{m.concept_id}: {m.state}" for m in manifests))
            if all(m.state in ("ready", "failed") for m in manifests) \
                    or time.monotonic() > deadline:
                return manifests
            time.sleep(0.5)
