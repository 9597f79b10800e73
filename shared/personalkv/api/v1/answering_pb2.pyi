from personalkv.api.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AskOptions(_message.Message):
    __slots__ = ("top_k", "recompute_ratio", "max_new_tokens", "temperature", "top_p", "seed")
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTE_RATIO_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    top_k: int
    recompute_ratio: float
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    def __init__(self, top_k: _Optional[int] = ..., recompute_ratio: _Optional[float] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class AskRequest(_message.Message):
    __slots__ = ("user_id", "question", "photos", "options", "conversation_id", "start_conversation")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    PHOTOS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    START_CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    question: str
    photos: _containers.RepeatedCompositeFieldContainer[_common_pb2.Photo]
    options: AskOptions
    conversation_id: str
    start_conversation: bool
    def __init__(self, user_id: _Optional[str] = ..., question: _Optional[str] = ..., photos: _Optional[_Iterable[_Union[_common_pb2.Photo, _Mapping]]] = ..., options: _Optional[_Union[AskOptions, _Mapping]] = ..., conversation_id: _Optional[str] = ..., start_conversation: _Optional[bool] = ...) -> None: ...

class UsedConcept(_message.Message):
    __slots__ = ("concept_id", "score")
    CONCEPT_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    concept_id: str
    score: float
    def __init__(self, concept_id: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class UsedChunk(_message.Message):
    __slots__ = ("chunk_id", "concept_id", "kind", "score", "from_earlier_turn")
    CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    FROM_EARLIER_TURN_FIELD_NUMBER: _ClassVar[int]
    chunk_id: str
    concept_id: str
    kind: _common_pb2.ChunkKind
    score: float
    from_earlier_turn: bool
    def __init__(self, chunk_id: _Optional[str] = ..., concept_id: _Optional[str] = ..., kind: _Optional[_Union[_common_pb2.ChunkKind, str]] = ..., score: _Optional[float] = ..., from_earlier_turn: _Optional[bool] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("retrieve_ms", "load_ms", "place_ms", "prefill_ms", "decode_ms", "total_ms", "recompute_ms", "rebuild_ms", "queue_ms")
    RETRIEVE_MS_FIELD_NUMBER: _ClassVar[int]
    LOAD_MS_FIELD_NUMBER: _ClassVar[int]
    PLACE_MS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    REBUILD_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    retrieve_ms: float
    load_ms: float
    place_ms: float
    prefill_ms: float
    decode_ms: float
    total_ms: float
    recompute_ms: float
    rebuild_ms: float
    queue_ms: float
    def __init__(self, retrieve_ms: _Optional[float] = ..., load_ms: _Optional[float] = ..., place_ms: _Optional[float] = ..., prefill_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., recompute_ms: _Optional[float] = ..., rebuild_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ...) -> None: ...

class AskResponse(_message.Message):
    __slots__ = ("answer", "concepts", "chunks", "timings", "personal_evidence_used", "conversation_id")
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    PERSONAL_EVIDENCE_USED_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    answer: str
    concepts: _containers.RepeatedCompositeFieldContainer[UsedConcept]
    chunks: _containers.RepeatedCompositeFieldContainer[UsedChunk]
    timings: Timings
    personal_evidence_used: bool
    conversation_id: str
    def __init__(self, answer: _Optional[str] = ..., concepts: _Optional[_Iterable[_Union[UsedConcept, _Mapping]]] = ..., chunks: _Optional[_Iterable[_Union[UsedChunk, _Mapping]]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., personal_evidence_used: _Optional[bool] = ..., conversation_id: _Optional[str] = ...) -> None: ...

class ListConversationsRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class Conversation(_message.Message):
    __slots__ = ("conversation_id", "turns", "concept_ids", "kv_tokens", "created_unix_ms", "updated_unix_ms", "first_question")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_IDS_FIELD_NUMBER: _ClassVar[int]
    KV_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    FIRST_QUESTION_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    turns: int
    concept_ids: _containers.RepeatedScalarFieldContainer[str]
    kv_tokens: int
    created_unix_ms: int
    updated_unix_ms: int
    first_question: str
    def __init__(self, conversation_id: _Optional[str] = ..., turns: _Optional[int] = ..., concept_ids: _Optional[_Iterable[str]] = ..., kv_tokens: _Optional[int] = ..., created_unix_ms: _Optional[int] = ..., updated_unix_ms: _Optional[int] = ..., first_question: _Optional[str] = ...) -> None: ...

class ListConversationsResponse(_message.Message):
    __slots__ = ("conversations",)
    CONVERSATIONS_FIELD_NUMBER: _ClassVar[int]
    conversations: _containers.RepeatedCompositeFieldContainer[Conversation]
    def __init__(self, conversations: _Optional[_Iterable[_Union[Conversation, _Mapping]]] = ...) -> None: ...

class EndConversationRequest(_message.Message):
    __slots__ = ("user_id", "conversation_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    conversation_id: str
    def __init__(self, user_id: _Optional[str] = ..., conversation_id: _Optional[str] = ...) -> None: ...

class EndConversationResponse(_message.Message):
    __slots__ = ("existed",)
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    existed: bool
    def __init__(self, existed: _Optional[bool] = ...) -> None: ...

class AskStreamResponse(_message.Message):
    __slots__ = ("text_delta", "final")
    TEXT_DELTA_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    text_delta: str
    final: AskResponse
    def __init__(self, text_delta: _Optional[str] = ..., final: _Optional[_Union[AskResponse, _Mapping]] = ...) -> None: ...
