"""The concept manifest: the source of truth for one concept of one user.

Written by the mining/caching pipeline through `ChunkStore.write_manifest` (always last, after
every blob it names), read by the retriever and the Ask path through `ChunkStore.read_manifest`.
A concept exists exactly when its manifest exists. Every id is validated on construction, so a
manifest read back from storage cannot smuggle a bad id into a key either.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from personalkv.chunk_ref import ChunkRef
from personalkv.ids import validate_concept_id, validate_hex_digest, validate_user_id

MANIFEST_FORMAT_VERSION = 2  # 2: lease_until

ConceptState = Literal["queued", "mining", "caching", "ready", "failed"]


class _Model(BaseModel):
    # forbid: a misspelt field is a bug, not data to carry along silently.
    model_config = ConfigDict(extra="forbid")


class ConceptProfile(_Model):
    """What the user told us about the concept, plus what the VLM described."""

    name: str = Field(min_length=1, max_length=200)
    category: str = Field("", max_length=100)
    info: str = Field("", max_length=10_000, description="The user's free text about it.")
    caption: str = Field("", max_length=10_000)
    attributes: list[str] = Field(default_factory=list, description='"part: descriptor" items.')
    source: Literal["user_facts", "vlm"] = "user_facts"


class PhotoRecord(_Model):
    """One reference photo as stored (`ChunkStore.put_photo` returns it)."""

    photo_id: str
    object_key: str
    media_type: str
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    bytes: int = Field(ge=0)

    _check_id = field_validator("photo_id")(lambda v: validate_hex_digest(v, "photo id"))


class PatchRecord(_Model):
    """A mined patch: a box on one photo and the scores that selected it."""

    photo_id: str
    box: tuple[int, int, int, int] = Field(description="(x0, y0, x1, y1) in photo pixels.")
    score: float
    scores: dict[str, float] = Field(default_factory=dict)

    _check_id = field_validator("photo_id")(lambda v: validate_hex_digest(v, "photo id"))

    @field_validator("box")
    @classmethod
    def _box_is_proper(cls, box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        x0, y0, x1, y1 = box
        if min(box) < 0 or x1 <= x0 or y1 <= y0:
            raise ValueError(f"box {box} must satisfy 0 <= x0 < x1 and 0 <= y0 < y1")
        return box


#: States in which a concept's background work is pending or running.
IN_FLIGHT_STATES = ("queued", "mining", "caching")


class ConceptManifest(_Model):
    """One concept: profile, photos, mined patches, chunks, lifecycle state."""

    format_version: int = MANIFEST_FORMAT_VERSION
    user_id: str
    concept_id: str
    state: ConceptState = "queued"
    failure_reason: str | None = None
    profile: ConceptProfile
    photos: list[PhotoRecord] = Field(default_factory=list)
    patches: list[PatchRecord] = Field(default_factory=list)
    #: The windows that outline the concept on each mined photo (the miner's best few per
    #: photo): the recognizer lets only keypoints inside them (and the patches) vote, not the
    #: shared home background. Not encoded as chunks.
    support: list[PatchRecord] = Field(default_factory=list)
    chunks: list[ChunkRef] = Field(default_factory=list)
    #: What the miner reported on its last run: which miner, the profile's source, errors
    #: (``miner_error``, ``profile_error``), photos described vs. read back from storage.
    mining_notes: dict[str, str | int | float | bool] = Field(default_factory=dict)
    model_fingerprint: str | None = None
    lease_until: datetime | None = Field(
        None, description="While queued, mining or caching: until when the work is known to be "
        "in hand (waiting in the broker, or a worker renewing it). Past it the reconciler "
        "enqueues the concept again (personalkv.service_layer.reconciler).",
    )
    updated_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))

    _check_user = field_validator("user_id")(lambda v: validate_user_id(v))
    _check_concept = field_validator("concept_id")(lambda v: validate_concept_id(v))

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, version: int) -> int:
        if not 1 <= version <= MANIFEST_FORMAT_VERSION:
            raise ValueError(
                f"manifest format_version {version} is not readable by this code "
                f"(knows 1..{MANIFEST_FORMAT_VERSION}); upgrade personalkv"
            )
        return version

    @model_validator(mode="after")
    def _consistent(self) -> ConceptManifest:
        photo_ids = {p.photo_id for p in self.photos}
        for patch in [*self.patches, *self.support]:
            if patch.photo_id not in photo_ids:
                raise ValueError(f"patch refers to unknown photo {patch.photo_id}")
        if self.state == "failed" and not self.failure_reason:
            raise ValueError("state 'failed' needs a failure_reason")
        return self

    @property
    def in_flight(self) -> bool:
        """Whether background work on the concept is pending or running (queued, mining,
        caching): what the work ledger (``ChunkStore.work_key``) lists."""
        return self.state in IN_FLIGHT_STATES

    def object_keys(self) -> list[str]:
        """Every object this manifest names (photos, then chunks)."""
        return [p.object_key for p in self.photos] + [c.object_key for c in self.chunks]

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=1).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes | str) -> ConceptManifest:
        return cls.model_validate_json(data)
