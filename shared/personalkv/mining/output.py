"""What the service's miner is given and gives back (the mining seam of the ingest pipeline).

Light on purpose (no OpenCV, no torch): ``personalkv.service_layer.mining_port`` imports it even where
the miner itself cannot load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from PIL import Image

from personalkv.manifest import ConceptProfile, PatchRecord


@dataclass
class MiningOutput:
    patches: list[PatchRecord]  # new patches, for the photos given (become KV chunks)
    #: the best windows of each new photo: the concept's subject region for the recognizer
    support: list[PatchRecord] = field(default_factory=list)
    profile: ConceptProfile | None = None  # a richer profile, or None to keep the current one
    miner: str = "centre_crops"
    #: JSON-simple values; the pipeline writes them into the manifest's ``mining_notes``
    notes: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PhotoRef:
    """A stored photo of the user's: ``load()`` fetches and decodes it, which a miner with
    stored descriptors (``personalkv.mining.descriptors``) needs only when they are missing."""

    photo_id: str
    concept_id: str
    load: Callable[[], Image.Image]
