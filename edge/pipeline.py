"""Frame -> faces -> what goes on the wire: detect, track, then per face either the canonical crop
coded by the payload codec, or the query model's embedding of the face."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from facelink.config import EdgeConfig
from facelink.runtime.alignment import canonical_template, warp_face
from facelink.runtime.codecs import FaceCodec, create_codec
from facelink.runtime.codecs.face_aware import AlignedCropCodec
from facelink.runtime.codecs.learned import LearnedFaceCodec
from facelink.runtime.detection import Detection, FaceDetector, create_detector
from facelink.runtime.embeddings import pack_embedding
from facelink.runtime.recognition import Recognizer, create_recognizer
from facelink.v1 import common_pb2, recognition_pb2

from .sources import Frame
from .tracking import IouTracker


def landmarks_to_proto(points: np.ndarray) -> common_pb2.Landmarks:
    return common_pb2.Landmarks(points=[common_pb2.Point(x=float(x), y=float(y)) for x, y in points])


def box_to_proto(box: np.ndarray) -> common_pb2.Box:
    return common_pb2.Box(x=float(box[0]), y=float(box[1]), width=float(box[2]), height=float(box[3]))


@dataclass(frozen=True)
class EdgeFace:
    """One face ready to send, with what the device keeps for itself."""

    observation: recognition_pb2.FaceObservation
    detection: Detection
    crop: np.ndarray  # what the payload was made from: the canonical crop, or the query model's aligned face


def select_faces(detections: list[Detection], policy: str, frame_shape: tuple[int, ...]) -> list[Detection]:
    if policy == "all" or len(detections) <= 1:
        return detections
    if policy == "largest":
        return [max(detections, key=lambda d: d.area)]
    # "central": the face nearest the frame centre, as in portrait datasets such as LFW.
    centre = np.array([frame_shape[1] / 2, frame_shape[0] / 2])
    return [min(detections, key=lambda d: float(np.linalg.norm(d.box[:2] + d.box[2:] / 2 - centre)))]


def crop_codec(config: EdgeConfig) -> FaceCodec:
    """The payload codec of `config`: a learned codec codes the crop's border ring coarser when
    `config.crop_border` says so, by default at its bundle's `border_ring_quality`."""
    codec = create_codec(config.codec, quality=config.quality)
    if config.crop_border is None or not isinstance(codec, LearnedFaceCodec):
        return codec
    ring_quality = codec.manifest.border_ring_quality
    if config.quality is None and ring_quality is not None:
        codec = codec.at_quality(ring_quality)
    return AlignedCropCodec(codec, config.crop_border)


class EdgePipeline:
    def __init__(
        self,
        config: EdgeConfig,
        detector: FaceDetector | None = None,
        codec: FaceCodec | None = None,
        query: Recognizer | None = None,
    ) -> None:
        self.config = config
        self.detector = detector or create_detector(config.detector)
        self.codec: FaceCodec | None = None
        self.query: Recognizer | None = None
        if config.payload == "embedding":
            self.query = query or create_recognizer(config.query_model, config.backend)
        else:
            self.codec = codec or crop_codec(config)
        self.template = canonical_template(config.crop.size, config.crop.scale)
        self.tracker = IouTracker()
        self._request_id = 0

    def process(self, frame: Frame, *, camera_id: str | None = None) -> list[EdgeFace]:
        detections = select_faces(self.detector.detect(frame.image), self.config.faces, frame.image.shape)
        track_ids = self.tracker.update(np.array([d.box for d in detections], dtype=np.float32).reshape(-1, 4))
        faces = []
        for index, (detection, track_id) in enumerate(zip(detections, track_ids)):
            self._request_id += 1
            observation = recognition_pb2.FaceObservation(
                camera_id=camera_id or self.config.stream.camera_id,
                frame_sequence=frame.index,
                capture_time_us=frame.timestamp_us,
                track_id=track_id,
                face_index=index,
                box=box_to_proto(detection.box),
                landmarks=landmarks_to_proto(detection.landmarks),
                request_id=self._request_id,
            )
            if self.query is not None:
                crop = self.query.align(frame.image, detection.landmarks)
                observation.embedding.CopyFrom(self.embed(crop))
            else:
                assert self.codec is not None
                crop, crop_landmarks = warp_face(frame.image, detection.landmarks, self.template)
                observation.payload_landmarks.CopyFrom(landmarks_to_proto(crop_landmarks))
                observation.face.CopyFrom(
                    common_pb2.EncodedFace(
                        codec_id=self.codec.codec_id, codec_version=self.codec.version, data=self.codec.encode(crop)
                    )
                )
            faces.append(EdgeFace(observation, detection, crop))
        return faces

    def embed(self, aligned: np.ndarray) -> common_pb2.Embedding:
        """The query model's embedding of one face aligned to its template, packed for the wire."""
        assert self.query is not None
        vector = self.query.embed_aligned(aligned[None])[0]
        data, scale = pack_embedding(vector, self.config.embedding_dtype)
        return common_pb2.Embedding(
            model_id=self.query.embedding_space,  # an int8 export of the query model speaks for its source
            dtype=common_pb2.DType.Value(f"DTYPE_{self.config.embedding_dtype.upper()}"),
            dim=int(vector.size),
            scale=scale,
            data=data,
        )
