"""Entry point for the service layer's mining port (personalkv.service_layer.mining_port).

``mine_for_service`` runs named steps: working copies of the photos, the negative pool, the
miner, the new photos' patch records (with support windows for photos without a patch), their
boxes back in the original frame, and the profile."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Sequence

from personalkv.config import MiningSettings
from personalkv.images import rgb_array
from personalkv.manifest import PatchRecord
from personalkv.mining.output import MiningOutput, PhotoRef
from personalkv.storage.base import ObjectNotFound

log = logging.getLogger(__name__)


def mine_for_service(manifest, photos: dict, *, settings: MiningSettings,
                     context: dict | None = None, negatives: Sequence = (), descriptors=None,
                     adapter=None, patches_per_photo: int = 2) -> MiningOutput:
    """Mines the ``photos`` (photo id -> PIL image) of ``manifest``'s concept: the top-k patches
    of the concept plus, for a photo that holds none of them, its best ``patches_per_photo``
    windows; the support windows of every new photo (the recognizer's subject region); the
    profile from the VLM's description of the first photo when it passes the schema, else from
    the user's facts (``source`` records which).

    ``settings``: the process's mining settings (the caller's ``Settings.mining``).
    ``context``: the concept's photos mined before (photo id -> PIL). They count as evidence of
    consistency (a window is the concept's when it recurs in its other photos) but get no new
    patches, so adding a photo re-mines nothing. ``negatives``: the user's other concepts'
    photos (``PhotoRef``, or PIL images), added to the generic pool
    ``PERSONALKV_MINING_NEGATIVE_POOL`` (when set): a window that matches them is not
    distinctive of this concept. ``descriptors``: the user's stored photo descriptors
    (``DescriptorStore``); with it no stored photo is described twice and a ``PhotoRef``
    negative is not even fetched. ``adapter``: the process's model adapter (or a callable
    returning it), for the profile and the ``vlm`` patch embedder; None: the profile comes
    from the user's facts (the notes say so) and no model is loaded here."""
    from personalkv.mining.miner import Miner, build_library

    cid = manifest.concept_id
    context = {k: v for k, v in (context or {}).items() if k not in photos}
    ids = list(photos) + list(context)
    originals = {**photos, **context}
    images = [rgb_array(originals[i], settings.max_side) for i in ids]
    owners = {i: cid for i in ids}
    owners.update({n.photo_id: n.concept_id for n in negatives if isinstance(n, PhotoRef)})
    cache = descriptors.cache_for(manifest.user_id, owners) if descriptors is not None else None
    pool, pool_ids = _negative_pool(negatives, cache, settings)
    library = build_library(settings, {cid: images}, pool, {cid: ids}, pool_ids, cache=cache,
                            adapter=adapter)
    mined = Miner(library, settings).mine(cid, images, manifest.profile.info)
    records, support = _new_photo_records(mined, ids, set(photos), patches_per_photo)
    scale = {i: originals[i].size[0] / img.shape[1] for i, img in zip(ids, images)}
    records = [_rescale(r, scale[r.photo_id]) for r in records]
    support = [_rescale(r, scale[r.photo_id]) for r in support]
    notes: dict = {}
    profile = _write_profile(manifest, [originals[i] for i in ids[:1]], settings, adapter, notes)
    if cache is not None:
        notes.update(photos_described=cache.described, descriptors_loaded=cache.loaded)
    return MiningOutput(patches=records, support=support, profile=profile, miner="personalkv.mining",
                        notes={**notes, "profile_source": profile.source, "context_photos": len(context),
                               "negative_photos": len(pool),
                               "settings": hashlib.sha256(settings.model_dump_json().encode()).hexdigest()[:12]})


def _negative_pool(negatives: Sequence, cache, settings: MiningSettings) -> tuple[list, list[str]]:
    """The negatives as the library takes them (arrays, lazy loaders, or None for a photo whose
    descriptors are stored) with their ids: the user's other concepts' photos, then the generic
    pool folder."""
    pool: list = []
    pool_ids: list[str] = []
    for k, neg in enumerate(negatives):
        if not isinstance(neg, PhotoRef):
            pool.append(rgb_array(neg, settings.max_side))
            pool_ids.append(f"negative/{k}")
        elif cache is not None and neg.photo_id in cache:  # stored: no pixels needed
            pool.append(None)
            pool_ids.append(neg.photo_id)
        else:
            try:
                pool.append(rgb_array(neg.load(), settings.max_side))
            except ObjectNotFound:  # its concept was deleted meanwhile: a negative less
                continue
            pool_ids.append(neg.photo_id)
    if settings.negative_pool:
        for p in sorted(Path(settings.negative_pool).glob("*.jpg")):
            pool.append(lambda p=p: rgb_array(p, settings.max_side))
            pool_ids.append(str(p))
    return pool, pool_ids


def _new_photo_records(mined, ids: list[str], new: set[str],
                       patches_per_photo: int) -> tuple[list[PatchRecord], list[PatchRecord]]:
    """(patches, support windows) of the new photos, in the working copies' frame: the mined
    patches plus, for a new photo that holds none, its first ``patches_per_photo`` support
    windows."""
    records = [r for r in mined.patch_records() if r.photo_id in new]
    covered = {p.photo_index for p in mined.patches if ids[p.photo_index] in new}
    per_photo: dict[int, int] = {}
    support = []
    for local_i, box in mined.support:
        if ids[local_i] not in new:
            continue
        support.append(PatchRecord(photo_id=ids[local_i], box=box, score=0.0, scores={"support": 1.0}))
        if local_i in covered or per_photo.get(local_i, 0) >= patches_per_photo:
            continue
        per_photo[local_i] = per_photo.get(local_i, 0) + 1
        records.append(support[-1])
    return records, support


def _write_profile(manifest, first_photo: list, settings: MiningSettings, adapter, notes: dict):
    """The profile from the VLM's description of the first photo (``profile_from_vlm`` and a
    model that takes images), else from the user's facts; a VLM that cannot load or run is
    noted in ``notes`` and logged as a warning, not raised."""
    from personalkv.mining.profile import ProfileWriter, vlm_generate

    p = manifest.profile
    try:
        generate = None
        if settings.profile_from_vlm:
            if adapter is None:
                raise LookupError("no model adapter given to the miner")
            model = adapter() if callable(adapter) else adapter
            # A text-only model (smollm2) cannot describe a photo: facts, as expected, no warning
            generate = vlm_generate(model) if model.supports_images else None
        return ProfileWriter(generate).write(p.name, p.category, p.info, first_photo)
    except Exception as exc:  # the VLM cannot load or run here: the patches still count
        log.warning("profile of %s/%s from the user's facts: the VLM failed (%s)",
                    manifest.user_id, manifest.concept_id, exc)
        notes["profile_error"] = f"{type(exc).__name__}: {exc}"[:200]
        return ProfileWriter().write(p.name, p.category, p.info)


def _rescale(record, factor: float):
    if abs(factor - 1.0) < 1e-6:
        return record
    x0, y0, x1, y1 = (int(round(v * factor)) for v in record.box)
    return record.model_copy(update={"box": (x0, y0, max(x1, x0 + 1), max(y1, y0 + 1))})
