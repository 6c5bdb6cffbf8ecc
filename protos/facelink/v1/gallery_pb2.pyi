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

class ListUnknownsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "max_crops")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MAX_CROPS_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    max_crops: int
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., max_crops: _Optional[int] = ...) -> None: ...

class UnknownCrop(_message.Message):
    __slots__ = ("image", "landmarks", "quality", "camera_id", "seen_time_us")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    LANDMARKS_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    CAMERA_ID_FIELD_NUMBER: _ClassVar[int]
    SEEN_TIME_US_FIELD_NUMBER: _ClassVar[int]
    image: _common_pb2.Image
    landmarks: _common_pb2.Landmarks
    quality: float
    camera_id: str
    seen_time_us: int
    def __init__(self, image: _Optional[_Union[_common_pb2.Image, _Mapping]] = ..., landmarks: _Optional[_Union[_common_pb2.Landmarks, _Mapping]] = ..., quality: _Optional[float] = ..., camera_id: _Optional[str] = ..., seen_time_us: _Optional[int] = ...) -> None: ...

class UnknownInfo(_message.Message):
    __slots__ = ("unknown_id", "first_seen_time_us", "last_seen_time_us", "cameras", "sightings", "crops", "crops_kept")
    UNKNOWN_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEEN_TIME_US_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_TIME_US_FIELD_NUMBER: _ClassVar[int]
    CAMERAS_FIELD_NUMBER: _ClassVar[int]
    SIGHTINGS_FIELD_NUMBER: _ClassVar[int]
    CROPS_FIELD_NUMBER: _ClassVar[int]
    CROPS_KEPT_FIELD_NUMBER: _ClassVar[int]
    unknown_id: str
    first_seen_time_us: int
    last_seen_time_us: int
    cameras: _containers.RepeatedScalarFieldContainer[str]
    sightings: int
    crops: _containers.RepeatedCompositeFieldContainer[UnknownCrop]
    crops_kept: int
    def __init__(self, unknown_id: _Optional[str] = ..., first_seen_time_us: _Optional[int] = ..., last_seen_time_us: _Optional[int] = ..., cameras: _Optional[_Iterable[str]] = ..., sightings: _Optional[int] = ..., crops: _Optional[_Iterable[_Union[UnknownCrop, _Mapping]]] = ..., crops_kept: _Optional[int] = ...) -> None: ...

class ListUnknownsResponse(_message.Message):
    __slots__ = ("unknowns", "next_page_token", "total")
    UNKNOWNS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    unknowns: _containers.RepeatedCompositeFieldContainer[UnknownInfo]
    next_page_token: str
    total: int
    def __init__(self, unknowns: _Optional[_Iterable[_Union[UnknownInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total: _Optional[int] = ...) -> None: ...

class EnrollUnknownRequest(_message.Message):
    __slots__ = ("unknown_id", "identity", "replace", "metadata", "max_crops")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    UNKNOWN_ID_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    MAX_CROPS_FIELD_NUMBER: _ClassVar[int]
    unknown_id: str
    identity: str
    replace: bool
    metadata: _containers.ScalarMap[str, str]
    max_crops: int
    def __init__(self, unknown_id: _Optional[str] = ..., identity: _Optional[str] = ..., replace: _Optional[bool] = ..., metadata: _Optional[_Mapping[str, str]] = ..., max_crops: _Optional[int] = ...) -> None: ...

class EnrollUnknownResponse(_message.Message):
    __slots__ = ("identity", "templates_added", "templates_total", "unknown_id")
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    TEMPLATES_ADDED_FIELD_NUMBER: _ClassVar[int]
    TEMPLATES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_ID_FIELD_NUMBER: _ClassVar[int]
    identity: str
    templates_added: int
    templates_total: int
    unknown_id: str
    def __init__(self, identity: _Optional[str] = ..., templates_added: _Optional[int] = ..., templates_total: _Optional[int] = ..., unknown_id: _Optional[str] = ...) -> None: ...

class ForgetUnknownRequest(_message.Message):
    __slots__ = ("unknown_id",)
    UNKNOWN_ID_FIELD_NUMBER: _ClassVar[int]
    unknown_id: str
    def __init__(self, unknown_id: _Optional[str] = ...) -> None: ...

class ForgetUnknownResponse(_message.Message):
    __slots__ = ("unknown_id", "crops_erased")
    UNKNOWN_ID_FIELD_NUMBER: _ClassVar[int]
    CROPS_ERASED_FIELD_NUMBER: _ClassVar[int]
    unknown_id: str
    crops_erased: int
    def __init__(self, unknown_id: _Optional[str] = ..., crops_erased: _Optional[int] = ...) -> None: ...
