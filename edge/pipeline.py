"""Frame -> faces -> what goes on the wire: detect, track, then per face either the canonical crop
coded by the payload codec, or the query model's embedding of the face.

Two steps, because most faces are never sent (edge/tracks.py sends a few shots per track):
:meth:`EdgePipeline.shots` detects, tracks, aligns the canonical crop and scores its quality
(edge/quality.py), all cheap; :meth:`EdgePipeline.observe` encodes one chosen shot, the costly
part (the learned codec's encoder, or the query model). :meth:`EdgePipeline.process` does both
for every face, as before.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
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

from .quality import FaceQuality, face_quality
from .sources import Frame
from .tracking import IouTracker

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class FaceShot:
    """One detected, tracked face of a frame, aligned and scored but not encoded yet."""

    frame: Frame
    detection: Detection
    track_id: int
    face_index: int
    crop: np.ndarray            # the canonical crop
    crop_landmarks: np.ndarray  # the landmarks in the crop
    quality: FaceQuality

    @property
    def box(self) -> tuple[float, float, float, float]:
        x, y, w, h = (float(v) for v in self.detection.box)
        return x, y, w, h


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
    codec = create_codec(config.codec, quality=config.quality, backend=config.backend)
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
        self.tracker = IouTracker(config.tracks.iou_threshold, config.tracks.lost_frames, config.tracks.lost_s)
        # One counter for every camera sharing this pipeline: request ids key the stream client's
        # in-flight faces, so two cameras on one client must never reuse one.
        self._request_ids: Iterator[int] = itertools.count(1)

    def new_tracker(self) -> IouTracker:
        """A tracker with this configuration's policy (one per camera)."""
        policy = self.config.tracks
        return IouTracker(policy.iou_threshold, policy.lost_frames, policy.lost_s)

    def shots(self, frame: Frame, tracker: IouTracker | None = None, faces: str | None = None) -> list[FaceShot]:
        """Detect, track (with `tracker`, default this pipeline's), align and score the faces of
        `frame` that `faces` (default the configuration's) selects."""
        tracker = tracker or self.tracker
        detections = select_faces(self.detector.detect(frame.image), faces or self.config.faces, frame.image.shape)
        boxes = np.array([d.box for d in detections], dtype=np.float32).reshape(-1, 4)
        track_ids = tracker.update(boxes, now=frame.timestamp_us / 1e6)
        shots = []
        for index, (detection, track_id) in enumerate(zip(detections, track_ids)):
            try:
                crop, crop_landmarks = warp_face(frame.image, detection.landmarks, self.template)
            except ValueError as error:  # NaN landmarks from a broken detection: not a face to send
                log.debug("face %d of %s skipped: %s", index, frame.name, error)
                continue
            quality = face_quality(detection.landmarks, detection.score, crop, self.template)
            shots.append(FaceShot(frame, detection, track_id, index, crop, crop_landmarks, quality))
        return shots

    def observe(self, shot: FaceShot, *, camera_id: str | None = None) -> EdgeFace:
        """Encode one shot: the observation that goes on the wire."""
        frame, detection = shot.frame, shot.detection
        observation = recognition_pb2.FaceObservation(
            camera_id=camera_id or self.config.stream.camera_id,
            frame_sequence=frame.index,
            capture_time_us=frame.timestamp_us,
            track_id=shot.track_id,
            face_index=shot.face_index,
            box=box_to_proto(detection.box),
            landmarks=landmarks_to_proto(detection.landmarks),
            request_id=next(self._request_ids),
        )
        if self.query is not None:
            crop = self.query.align(frame.image, detection.landmarks)
            observation.embedding.CopyFrom(self.embed(crop))
        else:
            assert self.codec is not None
            crop = shot.crop
            observation.payload_landmarks.CopyFrom(landmarks_to_proto(shot.crop_landmarks))
            observation.face.CopyFrom(
                common_pb2.EncodedFace(
                    codec_id=self.codec.codec_id, codec_version=self.codec.version, data=self.codec.encode(crop)
                )
            )
        return EdgeFace(observation, detection, crop)

    def process(self, frame: Frame, *, camera_id: str | None = None) -> list[EdgeFace]:
        """Every face of `frame`, encoded (no shot selection)."""
        return [self.observe(shot, camera_id=camera_id) for shot in self.shots(frame)]

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
