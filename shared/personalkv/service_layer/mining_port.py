"""The one place the pipeline calls patch mining (``pipeline.mine_concept`` -> ``svc.miner``,
which ``bootstrap`` sets to :func:`mine`).

Calls ``personalkv.mining.mine_for_service`` (the real miner: patch proposals, subject prior,
window appearance + RootSIFT consistency and distinctiveness, support windows, profile). If it
raises on a concept (its OpenCV / torch imports happen inside the call, so a missing dependency
raises there too), the new photos get centre crops and the profile is kept, so ingest never stalls on the miner; but the failure
is not silent: ``notes["miner_error"]`` says what happened and the pipeline writes it into the
manifest's ``mining_notes`` (with ``miner: centre_crops``). Chunks are keyed by content, so
switching miners only adds chunks for patches that changed.
"""

from __future__ import annotations

import logging

from PIL import Image

from personalkv import mining
from personalkv.config import MiningSettings
from personalkv.manifest import ConceptManifest, PatchRecord
from personalkv.mining.output import MiningOutput, PhotoRef

log = logging.getLogger(__name__)

#: Centre-crop side lengths of the fallback, as shares of the photo's shorter side.
FALLBACK_SCALES = (0.6, 0.9, 0.4, 0.75)


def centre_crops(photo_id: str, image: Image.Image, count: int) -> list[PatchRecord]:
    """``count`` square crops around the centre: the object is usually in the middle of a
    photo someone takes of their own thing."""
    width, height = image.size
    side = min(width, height)
    patches = []
    for i, scale in enumerate(FALLBACK_SCALES[:count]):
        s = max(8, int(side * scale))
        x0, y0 = (width - s) // 2, (height - s) // 2
        patches.append(PatchRecord(photo_id=photo_id, box=(x0, y0, x0 + s, y0 + s),
                                   score=round(1.0 - 0.1 * i, 3), scores={"centre_prior": 1.0}))
    return patches


def mine(manifest: ConceptManifest, photos: dict[str, Image.Image], *, settings: MiningSettings,
         context: dict[str, Image.Image] | None = None, negatives: list[PhotoRef] = (),
         descriptors=None, adapter=None, patches_per_photo: int = 2) -> MiningOutput:
    """Patches for ``photos`` (photo id -> RGB image; the concept's photos not mined yet) and
    maybe a new profile. ``settings``: the process's mining settings; ``manifest`` gives the
    concept's facts and its existing patches;
    ``context`` the concept's photos mined before (consistency evidence, no new patches);
    ``negatives`` the user's other concepts' photos (distinctiveness); ``descriptors`` the
    user's stored photo descriptors (``personalkv.mining.descriptors.DescriptorStore``);
    ``adapter`` the process's model adapter, or a callable returning it (profiles)."""
    try:
        return mining.mine_for_service(
            manifest, photos, settings=settings, context=context or {}, negatives=list(negatives),
            descriptors=descriptors, adapter=adapter, patches_per_photo=patches_per_photo)
    except Exception as exc:
        log.exception("the miner failed on %s/%s; using centre crops",
                      manifest.user_id, manifest.concept_id)
        error = f"{type(exc).__name__}: {exc}"
    patches = [p for photo_id, image in photos.items()
               for p in centre_crops(photo_id, image, patches_per_photo)]
    return MiningOutput(patches=patches, notes={"miner_error": error[:300]})


__all__ = ["FALLBACK_SCALES", "MiningOutput", "PhotoRef", "centre_crops", "mine"]
