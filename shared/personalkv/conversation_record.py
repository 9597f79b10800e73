"""A conversation's persisted record: what rebuilds its KV on any answering process.

Written by the answering use case (``service_layer.conversations``) after every turn, under the
user's prefix (``ChunkStore``: ``users/<user>/conversations/<id>.json``, compare-and-set so two
processes never both append turn N); read when a follow-up lands on a process that does not
hold the conversation's KV (another replica, an eviction, a restart). It holds no KV: the
evidence by ``ChunkRef`` (the chunks stay in the concepts' folders), each question, the object
key of its photo when the model saw one, and the answer's token ids, which is all
``kv.conversation.ConversationKV`` needs to replay the same cache.
"""

from __future__ import annotations

from datetime import datetime, timezone

from pydantic import BaseModel, ConfigDict, Field, field_validator

from personalkv.chunk_ref import ChunkRef
from personalkv.ids import validate_concept_id, validate_hex_digest, validate_user_id


class PlacedEvidence(BaseModel):
    """One chunk a turn placed, with the concept it belongs to."""

    model_config = ConfigDict(extra="forbid")

    concept_id: str
    chunk: ChunkRef

    _check_concept = field_validator("concept_id")(validate_concept_id)


class TurnRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str
    evidence: list[PlacedEvidence] = Field(
        default_factory=list, description="Chunks new in this turn, in placement order.")
    photo_key: str | None = Field(None, description="The question photo the model saw (stored).")
    answer: str = ""
    answer_token_ids: list[int] = Field(default_factory=list)
    max_new_tokens: int = Field(ge=1, description="Decides whether the answer's last token is in the cache.")
    recompute_ratio: float = Field(ge=0.0, le=1.0)
    recompute_strategy: str


class ConversationRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    conversation_id: str
    user_id: str
    model_fingerprint: str
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    updated_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    kv_tokens: int = Field(0, ge=0, description="Tokens in the conversation's KV after its last turn.")
    turns: list[TurnRecord] = Field(default_factory=list)

    _check_id = field_validator("conversation_id")(lambda v: validate_hex_digest(v, "conversation id"))
    _check_user = field_validator("user_id")(validate_user_id)

    @property
    def concept_ids(self) -> list[str]:
        """Every concept whose evidence the conversation holds, in placement order."""
        return list(dict.fromkeys(e.concept_id for turn in self.turns for e in turn.evidence))

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_json(cls, data: bytes) -> ConversationRecord:
        return cls.model_validate_json(data)
