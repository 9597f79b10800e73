"""The service layer's mining port finds and uses the real miner."""

from __future__ import annotations

import hashlib

from PIL import Image

from personalkv.manifest import ConceptManifest, ConceptProfile, PhotoRecord
from personalkv.service import mining_port


def test_port_uses_real_miner_and_every_photo_gets_a_patch(synth_factory):
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
    out = mining_port.mine(manifest, photos, patches_per_photo=2)
    assert out.miner == "personalkv.mining"
    assert out.profile.source == "user_facts" and out.profile.attributes == ["collar: black leather"]
    assert {p.photo_id for p in out.patches} == set(ids)
    assert all(p.box[2] <= 1024 and p.box[3] <= 1024 for p in out.patches)
    # the smallest window is 0.2 of the 640 px working copy: 128 px once rescaled to 1024
    assert min(p.box[2] - p.box[0] for p in out.patches) >= 120
    manifest.model_copy(update={"patches": out.patches}).model_validate(
        manifest.model_copy(update={"patches": out.patches}).model_dump())
