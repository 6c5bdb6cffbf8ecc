"""gRPC servicers: the only place that speaks facelink.v1 on the server side.

Protos are turned into engine calls here, and engine errors into gRPC statuses. On the stream,
a bad observation becomes a REJECTED result with an `Error` (the stream goes on); on a unary
call it becomes the call's status.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import grpc
import numpy as np

import facelink
from facelink.runtime.codecs import CodecError, available_codecs, decode_image
from facelink.runtime.embeddings import unpack_embedding
from facelink.v1 import common_pb2, gallery_pb2, gallery_pb2_grpc, recognition_pb2, recognition_pb2_grpc

from .gallery import InvalidIdentityError, UnknownIdentityError
from .engine import Decision, EnrollFace, Identification, RecognitionEngine
from .errors import InvalidArgument, NotFound, ResourceExhausted, ServiceError
from .metrics import ServiceMetrics

log = logging.getLogger(__name__)

API_VERSION = "facelink.v1"
_DTYPES = {common_pb2.DTYPE_FLOAT32: "float32", common_pb2.DTYPE_FLOAT16: "float16", common_pb2.DTYPE_INT8: "int8"}
_IMAGE_FORMATS = (common_pb2.IMAGE_FORMAT_JPEG, common_pb2.IMAGE_FORMAT_PNG, common_pb2.IMAGE_FORMAT_WEBP)
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
_DECISIONS = {Decision.MATCH: recognition_pb2.DECISION_MATCH, Decision.UNKNOWN: recognition_pb2.DECISION_UNKNOWN}


def landmarks_from_proto(message: common_pb2.Landmarks, what: str) -> np.ndarray | None:
    if not message.points:
        return None
    if len(message.points) != 5:
        raise InvalidArgument(f"{what}: expected 5 landmarks, got {len(message.points)}")
    return np.array([(p.x, p.y) for p in message.points], dtype=np.float32)


def image_from_proto(image: common_pb2.Image, what: str, max_side: int) -> np.ndarray:
    """A picture payload -> RGB array, or INVALID_ARGUMENT naming the picture and the problem."""
    if image.format not in _IMAGE_FORMATS:
        raise InvalidArgument(f"{what}: unsupported image format {image.format}")
    try:
        return decode_image(image.data, what=what, max_side=max_side)
    except CodecError as error:
        raise InvalidArgument(str(error)) from error


def box_to_proto(box: np.ndarray | None) -> common_pb2.Box:
    return common_pb2.Box() if box is None else common_pb2.Box(x=box[0], y=box[1], width=box[2], height=box[3])


class RecognitionService(recognition_pb2_grpc.RecognitionServicer):
    def __init__(self, engine: RecognitionEngine, metrics: ServiceMetrics | None = None) -> None:
        self.engine = engine
        self.limits = engine.config
        self.metrics = metrics or ServiceMetrics()
        # One decoder per codec id, shared by every stream (decoding keeps no state per call).
        self._codecs = available_codecs()
        self._decoders = {codec_id: info.create(info.default_quality) for codec_id, info in self._codecs.items()}

    # -- the stream -------------------------------------------------------------------------
    def Recognize(
        self, request_iterator: Iterator[recognition_pb2.FaceObservation], context: grpc.ServicerContext
    ) -> Iterator[recognition_pb2.FaceResult]:
        peer = context.peer()
        log.info("stream opened by %s", peer)
        self.metrics.streams.inc()
        try:
            yield from self._answer(request_iterator)
        finally:
            self.metrics.streams.dec()
            log.info("stream from %s closed", peer)

    def _answer(self, request_iterator: Iterator[recognition_pb2.FaceObservation]) -> Iterator[recognition_pb2.FaceResult]:
        for observation in request_iterator:
            started = time.perf_counter()
            result = recognition_pb2.FaceResult(
                camera_id=observation.camera_id,
                frame_sequence=observation.frame_sequence,
                track_id=observation.track_id,
                face_index=observation.face_index,
                request_id=observation.request_id,
            )
            try:
                self._fill(result, self._identify(observation))
            except ServiceError as error:
                self._reject(result, error.code, error.message)
            except Exception:  # a bug must cost one face, not the stream or the server
                log.exception("internal error on %s frame %d", observation.camera_id, observation.frame_sequence)
                self._reject(result, grpc.StatusCode.INTERNAL, "internal error while recognising this face; see server log")
            elapsed = time.perf_counter() - started
            result.server_latency_us = int(elapsed * 1e6)
            self._count(observation, result, elapsed)
            yield result

    def _count(self, observation: recognition_pb2.FaceObservation, result: recognition_pb2.FaceResult, elapsed: float) -> None:
        kind = observation.WhichOneof("payload") or "none"
        decision = recognition_pb2.Decision.Name(result.decision).removeprefix("DECISION_").lower()
        self.metrics.faces.labels(kind, decision).inc()
        self.metrics.latency.labels(kind).observe(elapsed)
        if kind != "none":
            self.metrics.payload_bytes.labels(kind).inc(len(getattr(observation, kind).data))
        if result.HasField("error"):
            self.metrics.errors.labels(_CODE_NAMES.get(result.error.code, str(result.error.code))).inc()

    def _identify(self, observation: recognition_pb2.FaceObservation) -> Identification:
        kind = observation.WhichOneof("payload")
        if kind is None:
            raise InvalidArgument("observation has no payload (set one of face, embedding, image)")
        payload = getattr(observation, kind)
        size = len(payload.data)
        if size > self.limits.max_payload_bytes:
            raise ResourceExhausted(f"{kind} payload is {size} bytes, the limit is {self.limits.max_payload_bytes}")
        if kind == "embedding":
            return self._identify_embedding(payload)
        if kind == "face":
            image = self._decode_face(payload)
        else:
            image = image_from_proto(payload, "image payload", self.limits.max_image_side)
        landmarks = landmarks_from_proto(observation.payload_landmarks, "payload_landmarks")
        if landmarks is None and kind == "face":
            raise InvalidArgument("a face payload needs payload_landmarks (5 points in the crop's coordinates)")
        landmarks, _ = self.engine.locate_face(image, landmarks, f"{kind} payload")
        return self.engine.identify(image, landmarks)

    def _decode_face(self, face: common_pb2.EncodedFace) -> np.ndarray:
        decoder = self._decoders.get(face.codec_id)
        if decoder is None:
            raise InvalidArgument(f"unknown codec {face.codec_id!r}; this server decodes: {', '.join(sorted(self._decoders))}")
        if face.codec_version not in decoder.versions:
            raise InvalidArgument(
                f"codec {face.codec_id!r} version {face.codec_version} is not supported; supported: {list(decoder.versions)}"
            )
        try:
            image = decoder.decode(face.data)
        except CodecError as error:
            raise InvalidArgument(f"undecodable {face.codec_id} payload: {error}") from error
        self._check_side(image, f"{face.codec_id} payload")
        return image

    def _check_side(self, image: np.ndarray, what: str) -> None:
        if max(image.shape[:2]) > self.limits.max_image_side:
            raise InvalidArgument(f"{what} is {image.shape[1]}x{image.shape[0]}, over {self.limits.max_image_side} px")

    def _identify_embedding(self, embedding: common_pb2.Embedding) -> Identification:
        dtype = _DTYPES.get(embedding.dtype)
        if dtype is None:
            raise InvalidArgument(f"embedding dtype {embedding.dtype} is not one of float32, float16, int8")
        try:
            vector = unpack_embedding(embedding.data, dtype, embedding.dim, embedding.scale)
        except ValueError as error:
            raise InvalidArgument(f"embedding: {error}") from error
        return self.engine.identify_embedding(vector, embedding.model_id)

    @staticmethod
    def _fill(result: recognition_pb2.FaceResult, found: Identification) -> None:
        result.decision = _DECISIONS[found.decision]
        result.identity = found.identity
        result.score = found.score
        result.threshold = found.threshold
        result.model_id = found.model_id

    @staticmethod
    def _reject(result: recognition_pb2.FaceResult, code: grpc.StatusCode, message: str) -> None:
        result.decision = recognition_pb2.DECISION_REJECTED
        result.error.code = code.value[0]
        result.error.message = message

    # -- capabilities -------------------------------------------------------------------------
    def GetCapabilities(self, request, context) -> recognition_pb2.Capabilities:  # noqa: ANN001
        return recognition_pb2.Capabilities(
            api_version=API_VERSION,
            server_version=facelink.__version__,
            codecs=[
                recognition_pb2.CodecInfo(codec_id=codec_id, versions=list(info.versions), description=info.description)
                for codec_id, info in sorted(self._codecs.items())
            ],
            # Every gallery model ("recognizer", the primary first) and every accepted query model.
            models=[
                recognition_pb2.ModelInfo(
                    model_id=model.model_id, role=model.role, embedding_dim=model.dim, input=model.input, sha256=model.sha256
                )
                for model in self.engine.models.values()
            ],
            limits=recognition_pb2.Limits(
                max_message_bytes=self.limits.max_message_bytes,
                max_payload_bytes=self.limits.max_payload_bytes,
                max_images_per_enroll=self.limits.max_images_per_enroll,
                max_image_side=self.limits.max_image_side,
            ),
            match_threshold=self.engine.threshold,
            image_formats=list(_IMAGE_FORMATS),
        )


class GalleryService(gallery_pb2_grpc.GalleryServicer):
    def __init__(self, engine: RecognitionEngine) -> None:
        self.engine = engine

    def Enroll(self, request: gallery_pb2.EnrollRequest, context: grpc.ServicerContext) -> gallery_pb2.EnrollResponse:
        limits = self.engine.config
        try:
            if not request.images:
                raise InvalidArgument("enroll needs at least one image")
            if len(request.images) > limits.max_images_per_enroll:
                raise ResourceExhausted(
                    f"{len(request.images)} images in one call, the limit is {limits.max_images_per_enroll}"
                )
            faces = [
                EnrollFace(
                    image_from_proto(item.image, f"image {i}", limits.max_image_side),
                    landmarks_from_proto(item.landmarks, f"image {i}"),
                )
                for i, item in enumerate(request.images)
            ]
            added, total, boxes = self.engine.enroll(
                request.identity, faces, replace=request.replace, metadata=dict(request.metadata)
            )
        except InvalidIdentityError as error:
            _abort(context, InvalidArgument(str(error)))
        except ServiceError as error:
            _abort(context, error)
        return gallery_pb2.EnrollResponse(
            identity=request.identity, templates_added=added, templates_total=total, faces=[box_to_proto(b) for b in boxes]
        )

    def RemoveIdentity(self, request, context) -> gallery_pb2.RemoveIdentityResponse:  # noqa: ANN001
        try:
            removed = self.engine.gallery.remove(request.identity)
        except UnknownIdentityError:
            _abort(context, NotFound(f"unknown identity {request.identity!r}"))
        return gallery_pb2.RemoveIdentityResponse(identity=request.identity, templates_removed=removed)

    def ListIdentities(self, request, context) -> gallery_pb2.ListIdentitiesResponse:  # noqa: ANN001
        page_size = request.page_size or 100
        if page_size > 1000:
            _abort(context, InvalidArgument(f"page_size {page_size} is over 1000"))
        try:
            offset = int(request.page_token or 0)
            if offset < 0:
                raise ValueError
        except ValueError:
            _abort(context, InvalidArgument(f"page_token {request.page_token!r} was not issued by this server"))
        records, total = self.engine.gallery.list(offset, page_size)
        next_offset = offset + len(records)
        return gallery_pb2.ListIdentitiesResponse(
            identities=[
                gallery_pb2.IdentityInfo(
                    identity=r.identity, templates=r.templates, created_time_us=r.created_time_us, metadata=r.metadata
                )
                for r in records
            ],
            next_page_token=str(next_offset) if next_offset < total else "",
            total=total,
        )


def _abort(context: grpc.ServicerContext, error: ServiceError) -> None:
    log.info("refused: %s %s", error.code.name, error.message)
    context.abort(error.code, error.message)
