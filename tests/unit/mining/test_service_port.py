"""The service layer's mining port finds and uses the real miner."""

from __future__ import annotations

import hashlib

import pytest
from PIL import Image

from personalkv.config import MiningSettings
from personalkv.manifest import ConceptManifest, ConceptProfile, PhotoRecord
from personalkv.mining.registry import get_patch_embedder
from personalkv.service_layer import mining_port


@pytest.fixture(params=["colour", pytest.param("efficientnet-lite0", marks=pytest.mark.slow)])
def mining(request):
    """The real miner with the weights-free patch embedder in the fast tier, and with the
    shipped default (EfficientNet) in the full suite: the port's contract holds for both."""
    return MiningSettings(embedder=request.param)


def test_port_uses_real_miner_and_every_photo_gets_a_patch(synth_factory, mining):
    data = synth_factory(n_concepts=1, photos=3, n_backgrounds=4, seed=5)
    shots = data.concepts["c0"]
    ids = [hashlib.sha256(bytes([i])).hexdigest() for i in range(len(shots))]
    # the service hands photos at full size (above max_side): boxes must come back in its frame
    photos = {i: Image.fromarray(s.image).resize((1024, 1024)) for i, s in zip(ids, shots)}
    manifest = ConceptManifest(
        user_id="u1", concept_id="c0",
        profile=ConceptProfile(name="Toy", category="toy", info="collar: black leather"),
        photos=[PhotoRecord(photo_id=i, object_key=f"k/{i}", media_type="image/png", width=1024,
                            height=1024, bytes=1) for i in ids])
    out = mining_port.mine(manifest, photos, settings=mining, patches_per_photo=2)
    assert out.miner == "personalkv.mining"
    assert out.profile.source == "user_facts" and out.profile.attributes == ["collar: black leather"]
    assert {p.photo_id for p in out.patches} == set(ids)
    assert all(p.box[2] <= 1024 and p.box[3] <= 1024 for p in out.patches)
    # the smallest window is a fixed share of the 640 px working copy (0.2 for the colour
    # embedder, 0.3 for EfficientNet), e.g. 204.8 px once rescaled to 1024; 1 px of rounding
    smallest = get_patch_embedder(mining.embedder).window_fractions[0] * 1024
    assert min(p.box[2] - p.box[0] for p in out.patches) >= smallest - 1
    manifest.model_copy(update={"patches": out.patches}).model_validate(
        manifest.model_copy(update={"patches": out.patches}).model_dump())


def test_a_new_photo_is_mined_against_the_concepts_earlier_photos_and_other_concepts(synth_factory, mining):
    """Adding a photo: only it gets patches, but its windows are scored for consistency with
    the photos mined before (``context``); alone, no window can recur anywhere."""
    data = synth_factory(n_concepts=2, photos=4, n_backgrounds=6, seed=11)
    shots = data.concepts["c0"]
    ids = [hashlib.sha256(bytes([i])).hexdigest() for i in range(len(shots))]
    photos = {i: Image.fromarray(s.image) for i, s in zip(ids, shots)}
    manifest = ConceptManifest(
        user_id="u1", concept_id="c0", profile=ConceptProfile(name="Toy", category="toy"),
        photos=[PhotoRecord(photo_id=i, object_key=f"k/{i}", media_type="image/png", width=256,
                            height=256, bytes=1) for i in ids])
    new, context = {ids[-1]: photos[ids[-1]]}, {i: photos[i] for i in ids[:-1]}
    others = [Image.fromarray(s.image) for s in data.concepts["c1"]]

    alone = mining_port.mine(manifest, new, settings=mining, patches_per_photo=2)
    with_context = mining_port.mine(manifest, new, settings=mining, context=context, negatives=others, patches_per_photo=2)
    assert with_context.notes["context_photos"] == 3 and with_context.notes["negative_photos"] == 4
    for out in (alone, with_context):
        assert out.miner == "personalkv.mining" and {p.photo_id for p in out.patches} == {ids[-1]}
    assert max(p.scores.get("appearance_consistency", 0) for p in alone.patches) == 1.0  # no evidence
    top = with_context.patches[0]
    assert top.scores["consistency"] > 0  # keypoints verified in the earlier photos
    # ... and the top patch lies on the object (the mark or the plain-coloured body)
    x0, y0, x1, y1 = top.box
    ox0, oy0, ox1, oy1 = shots[-1].object_box
    assert min(x1, ox1) > max(x0, ox0) and min(y1, oy1) > max(y0, oy0)


def test_a_vlm_that_cannot_load_leaves_the_patches_and_falls_back_to_facts(synth_factory, mining, monkeypatch):
    """E.g. PERSONALKV_MODEL_DEVICE=cuda on a CPU-only mining node: patches are still mined,
    the profile comes from the facts and the notes say why (not the centre-crop fallback)."""
    def no_gpu():
        raise RuntimeError("Found no NVIDIA driver on your system")

    data = synth_factory(n_concepts=1, photos=2, n_backgrounds=3, seed=2)
    ids = [hashlib.sha256(bytes([i])).hexdigest() for i in range(2)]
    photos = {i: Image.fromarray(s.image) for i, s in zip(ids, data.concepts["c0"])}
    manifest = ConceptManifest(user_id="u1", concept_id="c0", profile=ConceptProfile(name="Toy", info="ears: floppy"))
    out = mining_port.mine(manifest, photos, settings=mining, adapter=no_gpu,
                           patches_per_photo=1)
    assert out.miner == "personalkv.mining" and {p.photo_id for p in out.patches} == set(ids)
    assert out.profile.source == "user_facts" and out.profile.attributes == ["ears: floppy"]
    assert "NVIDIA" in out.notes["profile_error"]
