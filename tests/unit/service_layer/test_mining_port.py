"""The mining port: the real miner, centre crops as the fallback when it fails."""

from __future__ import annotations

from personalkv.config import MiningSettings
from personalkv.manifest import ConceptManifest, ConceptProfile
from personalkv.service_layer import mining_port
from PIL import Image

PHOTO_ID = "a" * 64


def test_centre_crops_are_square_inside_and_centred():
    patches = mining_port.centre_crops(PHOTO_ID, Image.new("RGB", (200, 100)), 3)
    assert len(patches) == 3
    for p in patches:
        x0, y0, x1, y1 = p.box
        assert 0 <= x0 < x1 <= 200 and 0 <= y0 < y1 <= 100 and x1 - x0 == y1 - y0
        assert abs((x0 + x1) / 2 - 100) <= 1 and abs((y0 + y1) / 2 - 50) <= 1


def test_a_miner_failure_gives_centre_crops_and_says_why(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("miner exploded")

    monkeypatch.setattr(mining_port.mining, "mine_for_service", broken)
    manifest = ConceptManifest(user_id="u", concept_id="c", profile=ConceptProfile(name="Bobo"))
    out = mining_port.mine(manifest, {PHOTO_ID: Image.new("RGB", (64, 48))}, settings=MiningSettings(),
                           patches_per_photo=2)
    assert out.miner == "centre_crops" and len(out.patches) == 2 and out.profile is None
    assert out.notes["miner_error"] == "RuntimeError: miner exploded"  # recorded, not silent


def test_uses_the_real_miner(monkeypatch):
    calls = []

    def real(manifest, photos, **options):
        calls.append(sorted(photos))
        return mining_port.MiningOutput(patches=[], miner="real")

    monkeypatch.setattr(mining_port.mining, "mine_for_service", real)  # personalkv.mining's
    manifest = ConceptManifest(user_id="u", concept_id="c", profile=ConceptProfile(name="Bobo"))
    out = mining_port.mine(manifest, {PHOTO_ID: Image.new("RGB", (64, 48))}, settings=MiningSettings())
    assert out.miner == "real" and calls == [[PHOTO_ID]]
