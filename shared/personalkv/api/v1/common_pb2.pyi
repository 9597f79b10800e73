import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ConceptState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONCEPT_STATE_UNSPECIFIED: _ClassVar[ConceptState]
    CONCEPT_STATE_QUEUED: _ClassVar[ConceptState]
    CONCEPT_STATE_MINING: _ClassVar[ConceptState]
    CONCEPT_STATE_CACHING: _ClassVar[ConceptState]
    CONCEPT_STATE_READY: _ClassVar[ConceptState]
    CONCEPT_STATE_FAILED: _ClassVar[ConceptState]

class ChunkKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHUNK_KIND_UNSPECIFIED: _ClassVar[ChunkKind]
    CHUNK_KIND_PROFILE_TEXT: _ClassVar[ChunkKind]
    CHUNK_KIND_IMAGE_PATCH: _ClassVar[ChunkKind]
CONCEPT_STATE_UNSPECIFIED: ConceptState
CONCEPT_STATE_QUEUED: ConceptState
CONCEPT_STATE_MINING: ConceptState
CONCEPT_STATE_CACHING: ConceptState
CONCEPT_STATE_READY: ConceptState
CONCEPT_STATE_FAILED: ConceptState
CHUNK_KIND_UNSPECIFIED: ChunkKind
CHUNK_KIND_PROFILE_TEXT: ChunkKind
CHUNK_KIND_IMAGE_PATCH: ChunkKind

class Photo(_message.Message):
    __slots__ = ("data", "filename")
    DATA_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    filename: str
    def __init__(self, data: _Optional[bytes] = ..., filename: _Optional[str] = ...) -> None: ...

class ConceptFacts(_message.Message):
    __slots__ = ("name", "category", "info")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    name: str
    category: str
    info: str
    def __init__(self, name: _Optional[str] = ..., category: _Optional[str] = ..., info: _Optional[str] = ...) -> None: ...

class Concept(_message.Message):
    __slots__ = ("concept_id", "facts", "state", "failure_reason", "photo_count", "patch_count", "chunk_count", "caption", "updated_at")
    CONCEPT_ID_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    FAILURE_REASON_FIELD_NUMBER: _ClassVar[int]
    PHOTO_COUNT_FIELD_NUMBER: _ClassVar[int]
    PATCH_COUNT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    CAPTION_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    concept_id: str
    facts: ConceptFacts
    state: ConceptState
    failure_reason: str
    photo_count: int
    patch_count: int
    chunk_count: int
    caption: str
    updated_at: _timestamp_pb2.Timestamp
    def __init__(self, concept_id: _Optional[str] = ..., facts: _Optional[_Union[ConceptFacts, _Mapping]] = ..., state: _Optional[_Union[ConceptState, str]] = ..., failure_reason: _Optional[str] = ..., photo_count: _Optional[int] = ..., patch_count: _Optional[int] = ..., chunk_count: _Optional[int] = ..., caption: _Optional[str] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
