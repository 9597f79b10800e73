"""Entry point for the service layer's mining port (personalkv.service.mining_port)."""

from __future__ import annotations

import hashlib
import logging

import numpy as np

log = logging.getLogger(__name__)


def mine_for_service(manifest, photos: dict, *, context: dict | None = None, negatives=(),
                     patches_per_photo: int = 2):
    """Mines the ``photos`` (photo id -> PIL image) of ``manifest``'s concept: the top-k patches
    of the concept plus, for a photo that holds none of them, its best ``patches_per_photo``
    windows; the profile from the VLM's description of the first photo when it passes the
    schema, else from the user's facts (``source`` records which).

    ``context``: the concept's photos mined before (photo id -> PIL). They count as evidence of
    consistency (a window is the concept's when it recurs in its other photos) but get no new
    patches, so adding a photo re-mines nothing. ``negatives``: the user's other concepts'
    photos (PIL), added to the generic pool ``PERSONALKV_MINING_NEGATIVE_POOL`` (when set): a
    window that matches them is not distinctive of this concept."""
    from pathlib import Path

    from personalkv.config import get_settings
    from personalkv.mining.features import load_rgb
    from personalkv.mining.miner import Miner, build_library
    from personalkv.mining.profile import ProfileWriter
    from personalkv.service.mining_port import MiningOutput

    settings = get_settings().mining
    context = {k: v for k, v in (context or {}).items() if k not in photos}
    ids = list(photos) + list(context)
    originals = {**photos, **context}
    images = [_rgb(originals[i], settings.max_side) for i in ids]
    pool = [_rgb(im, settings.max_side) for im in negatives]
    if settings.negative_pool:
        pool += [load_rgb(p, settings.max_side) for p in sorted(Path(settings.negative_pool).glob("*.jpg"))]
    cid = manifest.concept_id
    library = build_library(settings, {cid: images}, pool, {cid: ids})
    mined = Miner(library, settings).mine(cid, images, manifest.profile.info)
    scale = {i: originals[i].size[0] / img.shape[1] for i, img in zip(ids, images)}
    new = set(photos)
    records = [r for r in mined.patch_records() if r.photo_id in new]
    covered = {p.photo_index for p in mined.patches if ids[p.photo_index] in new}
    per_photo: dict[int, int] = {}
    from personalkv.manifest import PatchRecord

    for local_i, box in mined.support:
        if ids[local_i] not in new or local_i in covered or per_photo.get(local_i, 0) >= patches_per_photo:
            continue
        per_photo[local_i] = per_photo.get(local_i, 0) + 1
        records.append(PatchRecord(photo_id=ids[local_i], box=box, score=0.0, scores={"support": 1.0}))
    records = [_rescale(r, scale[r.photo_id]) for r in records]
    p = manifest.profile
    notes = {}
    try:
        generate = None
        if settings.profile_from_vlm:
            from personalkv.mining.profile import vlm_generate
            from personalkv.models import configured_adapter

            generate = vlm_generate(configured_adapter())
        profile = ProfileWriter(generate).write(p.name, p.category, p.info, [originals[i] for i in ids[:1]])
    except Exception as exc:  # the VLM cannot load or run here: the patches still count
        log.warning("profile of %s/%s from the user's facts: the VLM failed (%s)",
                    manifest.user_id, cid, exc)
        notes["profile_error"] = f"{type(exc).__name__}: {exc}"[:200]
        profile = ProfileWriter().write(p.name, p.category, p.info)
    return MiningOutput(patches=records, profile=profile, miner="personalkv.mining",
                        notes={**notes, "profile_source": profile.source, "context_photos": len(context),
                               "negative_photos": len(pool),
                               "settings": hashlib.sha256(settings.model_dump_json().encode()).hexdigest()[:12]})


def _rgb(image, max_side: int) -> np.ndarray:
    from PIL import Image

    im = image.convert("RGB")
    if max(im.size) > max_side:
        im = im.copy()
        im.thumbnail((max_side, max_side), Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8).copy()


def _rescale(record, factor: float):
    if abs(factor - 1.0) < 1e-6:
        return record
    x0, y0, x1, y1 = (int(round(v * factor)) for v in record.box)
    return record.model_copy(update={"box": (x0, y0, max(x1, x0 + 1), max(y1, y0 + 1))})
