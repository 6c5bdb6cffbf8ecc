from facelink.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EnrollImage(_message.Message):
    __slots__ = ("image", "landmarks")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    LANDMARKS_FIELD_NUMBER: _ClassVar[int]
    image: _common_pb2.Image
    landmarks: _common_pb2.Landmarks
    def __init__(self, image: _Optional[_Union[_common_pb2.Image, _Mapping]] = ..., landmarks: _Optional[_Union[_common_pb2.Landmarks, _Mapping]] = ...) -> None: ...

class EnrollRequest(_message.Message):
    __slots__ = ("identity", "images", "replace", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    identity: str
    images: _containers.RepeatedCompositeFieldContainer[EnrollImage]
    replace: bool
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, identity: _Optional[str] = ..., images: _Optional[_Iterable[_Union[EnrollImage, _Mapping]]] = ..., replace: _Optional[bool] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("identity", "templates_added", "templates_total", "faces")
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    TEMPLATES_ADDED_FIELD_NUMBER: _ClassVar[int]
    TEMPLATES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    FACES_FIELD_NUMBER: _ClassVar[int]
    identity: str
    templates_added: int
    templates_total: int
    faces: _containers.RepeatedCompositeFieldContainer[_common_pb2.Box]
    def __init__(self, identity: _Optional[str] = ..., templates_added: _Optional[int] = ..., templates_total: _Optional[int] = ..., faces: _Optional[_Iterable[_Union[_common_pb2.Box, _Mapping]]] = ...) -> None: ...

class RemoveIdentityRequest(_message.Message):
    __slots__ = ("identity",)
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    identity: str
    def __init__(self, identity: _Optional[str] = ...) -> None: ...

class RemoveIdentityResponse(_message.Message):
    __slots__ = ("identity", "templates_removed")
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    TEMPLATES_REMOVED_FIELD_NUMBER: _ClassVar[int]
    identity: str
    templates_removed: int
    def __init__(self, identity: _Optional[str] = ..., templates_removed: _Optional[int] = ...) -> None: ...

class ListIdentitiesRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class IdentityInfo(_message.Message):
    __slots__ = ("identity", "templates", "created_time_us", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    TEMPLATES_FIELD_NUMBER: _ClassVar[int]
    CREATED_TIME_US_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    identity: str
    templates: int
    created_time_us: int
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, identity: _Optional[str] = ..., templates: _Optional[int] = ..., created_time_us: _Optional[int] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ListIdentitiesResponse(_message.Message):
    __slots__ = ("identities", "next_page_token", "total")
    IDENTITIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    identities: _containers.RepeatedCompositeFieldContainer[IdentityInfo]
    next_page_token: str
    total: int
    def __init__(self, identities: _Optional[_Iterable[_Union[IdentityInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total: _Optional[int] = ...) -> None: ...
