from personalkv.api.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CreateConceptRequest(_message.Message):
    __slots__ = ("user_id", "concept_id", "facts")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_ID_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    concept_id: str
    facts: _common_pb2.ConceptFacts
    def __init__(self, user_id: _Optional[str] = ..., concept_id: _Optional[str] = ..., facts: _Optional[_Union[_common_pb2.ConceptFacts, _Mapping]] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("user_id", "concept_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    concept_id: str
    def __init__(self, user_id: _Optional[str] = ..., concept_id: _Optional[str] = ...) -> None: ...

class PhotoChunk(_message.Message):
    __slots__ = ("data", "end_of_photo", "filename")
    DATA_FIELD_NUMBER: _ClassVar[int]
    END_OF_PHOTO_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    end_of_photo: bool
    filename: str
    def __init__(self, data: _Optional[bytes] = ..., end_of_photo: _Optional[bool] = ..., filename: _Optional[str] = ...) -> None: ...

class UploadPhotosRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    chunk: PhotoChunk
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., chunk: _Optional[_Union[PhotoChunk, _Mapping]] = ...) -> None: ...

class UploadPhotosResponse(_message.Message):
    __slots__ = ("concept", "photos_received")
    CONCEPT_FIELD_NUMBER: _ClassVar[int]
    PHOTOS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    concept: _common_pb2.Concept
    photos_received: int
    def __init__(self, concept: _Optional[_Union[_common_pb2.Concept, _Mapping]] = ..., photos_received: _Optional[int] = ...) -> None: ...

class GetConceptRequest(_message.Message):
    __slots__ = ("user_id", "concept_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    concept_id: str
    def __init__(self, user_id: _Optional[str] = ..., concept_id: _Optional[str] = ...) -> None: ...

class ListConceptsRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class ListConceptsResponse(_message.Message):
    __slots__ = ("concepts",)
    CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    concepts: _containers.RepeatedCompositeFieldContainer[_common_pb2.Concept]
    def __init__(self, concepts: _Optional[_Iterable[_Union[_common_pb2.Concept, _Mapping]]] = ...) -> None: ...

class DeleteConceptRequest(_message.Message):
    __slots__ = ("user_id", "concept_id", "allow_missing")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_ID_FIELD_NUMBER: _ClassVar[int]
    ALLOW_MISSING_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    concept_id: str
    allow_missing: bool
    def __init__(self, user_id: _Optional[str] = ..., concept_id: _Optional[str] = ..., allow_missing: _Optional[bool] = ...) -> None: ...

class DeleteConceptResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeleteUserDataRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class DeleteUserDataResponse(_message.Message):
    __slots__ = ("concepts_deleted",)
    CONCEPTS_DELETED_FIELD_NUMBER: _ClassVar[int]
    concepts_deleted: int
    def __init__(self, concepts_deleted: _Optional[int] = ...) -> None: ...
