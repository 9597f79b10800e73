"""The one place the pipeline calls patch mining (``pipeline.mine_concept`` -> ``mine``).

Calls ``personalkv.mining.mine_for_service`` (the real miner: patch proposals, subject prior,
window appearance + RootSIFT consistency and distinctiveness, profile from the user's facts) when it imports; if it cannot be
imported (e.g. OpenCV missing) or raises on a concept, falls back to centre crops of every new
photo and keeps the profile as is, so ingest never stalls on the miner. Either way the pipeline
sees the same ``MiningOutput``; chunks are keyed by content, so switching miners only adds
chunks for patches that changed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from PIL import Image

from personalkv.manifest import ConceptManifest, ConceptProfile, PatchRecord

log = logging.getLogger(__name__)

#: Centre-crop side lengths of the fallback, as shares of the photo's shorter side.
FALLBACK_SCALES = (0.6, 0.9, 0.4, 0.75)


@dataclass
class MiningOutput:
    patches: list[PatchRecord]  # new patches, for the photos given
    profile: ConceptProfile | None = None  # a richer profile, or None to keep the current one
    miner: str = "centre_crops"
    notes: dict = field(default_factory=dict)


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


def _real_miner():
    """The real miner's entry point, when ``personalkv.mining`` offers one; else None."""
    try:
        from personalkv import mining
    except Exception:  # not there yet, or its optional deps (OpenCV) are missing
        return None
    return getattr(mining, "mine_for_service", None)


def mine(manifest: ConceptManifest, photos: dict[str, Image.Image], *,
         context: dict[str, Image.Image] | None = None, negatives: list[Image.Image] = (),
         patches_per_photo: int = 2) -> MiningOutput:
    """Patches for ``photos`` (photo id -> RGB image; the concept's photos not mined yet) and
    maybe a new profile. ``manifest`` gives the concept's facts and its existing patches;
    ``context`` the concept's photos mined before (consistency evidence, no new patches);
    ``negatives`` photos of the user's other concepts (distinctiveness)."""
    real = _real_miner()
    if real is not None:
        try:
            return real(manifest, photos, context=context or {}, negatives=list(negatives),
                        patches_per_photo=patches_per_photo)
        except Exception:
            log.exception("the miner failed on %s/%s; using centre crops",
                          manifest.user_id, manifest.concept_id)
    patches = [p for photo_id, image in photos.items()
               for p in centre_crops(photo_id, image, patches_per_photo)]
    return MiningOutput(patches=patches)
