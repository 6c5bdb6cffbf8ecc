from facelink.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_UNSPECIFIED: _ClassVar[Decision]
    DECISION_MATCH: _ClassVar[Decision]
    DECISION_UNKNOWN: _ClassVar[Decision]
    DECISION_REJECTED: _ClassVar[Decision]
DECISION_UNSPECIFIED: Decision
DECISION_MATCH: Decision
DECISION_UNKNOWN: Decision
DECISION_REJECTED: Decision

class FaceObservation(_message.Message):
    __slots__ = ("camera_id", "frame_sequence", "capture_time_us", "track_id", "face_index", "box", "landmarks", "payload_landmarks", "face", "embedding", "image", "request_id")
    CAMERA_ID_FIELD_NUMBER: _ClassVar[int]
    FRAME_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_TIME_US_FIELD_NUMBER: _ClassVar[int]
    TRACK_ID_FIELD_NUMBER: _ClassVar[int]
    FACE_INDEX_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    LANDMARKS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_LANDMARKS_FIELD_NUMBER: _ClassVar[int]
    FACE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    camera_id: str
    frame_sequence: int
    capture_time_us: int
    track_id: int
    face_index: int
    box: _common_pb2.Box
    landmarks: _common_pb2.Landmarks
    payload_landmarks: _common_pb2.Landmarks
    face: _common_pb2.EncodedFace
    embedding: _common_pb2.Embedding
    image: _common_pb2.Image
    request_id: int
    def __init__(self, camera_id: _Optional[str] = ..., frame_sequence: _Optional[int] = ..., capture_time_us: _Optional[int] = ..., track_id: _Optional[int] = ..., face_index: _Optional[int] = ..., box: _Optional[_Union[_common_pb2.Box, _Mapping]] = ..., landmarks: _Optional[_Union[_common_pb2.Landmarks, _Mapping]] = ..., payload_landmarks: _Optional[_Union[_common_pb2.Landmarks, _Mapping]] = ..., face: _Optional[_Union[_common_pb2.EncodedFace, _Mapping]] = ..., embedding: _Optional[_Union[_common_pb2.Embedding, _Mapping]] = ..., image: _Optional[_Union[_common_pb2.Image, _Mapping]] = ..., request_id: _Optional[int] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class FaceResult(_message.Message):
    __slots__ = ("camera_id", "frame_sequence", "track_id", "face_index", "request_id", "decision", "identity", "score", "threshold", "model_id", "server_latency_us", "error", "unknown_id")
    CAMERA_ID_FIELD_NUMBER: _ClassVar[int]
    FRAME_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TRACK_ID_FIELD_NUMBER: _ClassVar[int]
    FACE_INDEX_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_LATENCY_US_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_ID_FIELD_NUMBER: _ClassVar[int]
    camera_id: str
    frame_sequence: int
    track_id: int
    face_index: int
    request_id: int
    decision: Decision
    identity: str
    score: float
    threshold: float
    model_id: str
    server_latency_us: int
    error: Error
    unknown_id: str
    def __init__(self, camera_id: _Optional[str] = ..., frame_sequence: _Optional[int] = ..., track_id: _Optional[int] = ..., face_index: _Optional[int] = ..., request_id: _Optional[int] = ..., decision: _Optional[_Union[Decision, str]] = ..., identity: _Optional[str] = ..., score: _Optional[float] = ..., threshold: _Optional[float] = ..., model_id: _Optional[str] = ..., server_latency_us: _Optional[int] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., unknown_id: _Optional[str] = ...) -> None: ...

class GetCapabilitiesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CodecInfo(_message.Message):
    __slots__ = ("codec_id", "versions", "description")
    CODEC_ID_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    codec_id: str
    versions: _containers.RepeatedScalarFieldContainer[int]
    description: str
    def __init__(self, codec_id: _Optional[str] = ..., versions: _Optional[_Iterable[int]] = ..., description: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_id", "role", "embedding_dim", "input", "sha256")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    role: str
    embedding_dim: int
    input: str
    sha256: str
    def __init__(self, model_id: _Optional[str] = ..., role: _Optional[str] = ..., embedding_dim: _Optional[int] = ..., input: _Optional[str] = ..., sha256: _Optional[str] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_message_bytes", "max_payload_bytes", "max_images_per_enroll", "max_image_side")
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_PER_ENROLL_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_SIDE_FIELD_NUMBER: _ClassVar[int]
    max_message_bytes: int
    max_payload_bytes: int
    max_images_per_enroll: int
    max_image_side: int
    def __init__(self, max_message_bytes: _Optional[int] = ..., max_payload_bytes: _Optional[int] = ..., max_images_per_enroll: _Optional[int] = ..., max_image_side: _Optional[int] = ...) -> None: ...

class Capabilities(_message.Message):
    __slots__ = ("api_version", "server_version", "codecs", "models", "limits", "match_threshold", "image_formats")
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    CODECS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    MATCH_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FORMATS_FIELD_NUMBER: _ClassVar[int]
    api_version: str
    server_version: str
    codecs: _containers.RepeatedCompositeFieldContainer[CodecInfo]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    limits: Limits
    match_threshold: float
    image_formats: _containers.RepeatedScalarFieldContainer[_common_pb2.ImageFormat]
    def __init__(self, api_version: _Optional[str] = ..., server_version: _Optional[str] = ..., codecs: _Optional[_Iterable[_Union[CodecInfo, _Mapping]]] = ..., models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., match_threshold: _Optional[float] = ..., image_formats: _Optional[_Iterable[_Union[_common_pb2.ImageFormat, str]]] = ...) -> None: ...
