"""Frame -> faces -> what goes on the wire: detect, track, align to the canonical crop, encode."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from facelink.config import EdgeConfig
from facelink.runtime.alignment import canonical_template, warp_face
from facelink.runtime.codecs import FaceCodec, create_codec
from facelink.runtime.detection import Detection, FaceDetector, create_detector
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
    crop: np.ndarray  # the canonical aligned crop, before encoding


def select_faces(detections: list[Detection], policy: str, frame_shape: tuple[int, ...]) -> list[Detection]:
    if policy == "all" or len(detections) <= 1:
        return detections
    if policy == "largest":
        return [max(detections, key=lambda d: d.area)]
    # "central": the face nearest the frame centre, as in portrait datasets such as LFW.
    centre = np.array([frame_shape[1] / 2, frame_shape[0] / 2])
    return [min(detections, key=lambda d: float(np.linalg.norm(d.box[:2] + d.box[2:] / 2 - centre)))]


class EdgePipeline:
    def __init__(self, config: EdgeConfig, detector: FaceDetector | None = None, codec: FaceCodec | None = None) -> None:
        self.config = config
        self.detector = detector or create_detector(config.detector)
        self.codec = codec or create_codec(config.codec, quality=config.quality)
        self.template = canonical_template(config.crop.size, config.crop.scale)
        self.tracker = IouTracker()
        self._request_id = 0

    def process(self, frame: Frame, *, camera_id: str | None = None) -> list[EdgeFace]:
        detections = select_faces(self.detector.detect(frame.image), self.config.faces, frame.image.shape)
        track_ids = self.tracker.update(np.array([d.box for d in detections], dtype=np.float32).reshape(-1, 4))
        faces = []
        for index, (detection, track_id) in enumerate(zip(detections, track_ids)):
            crop, crop_landmarks = warp_face(frame.image, detection.landmarks, self.template)
            self._request_id += 1
            observation = recognition_pb2.FaceObservation(
                camera_id=camera_id or self.config.stream.camera_id,
                frame_sequence=frame.index,
                capture_time_us=frame.timestamp_us,
                track_id=track_id,
                face_index=index,
                box=box_to_proto(detection.box),
                landmarks=landmarks_to_proto(detection.landmarks),
                payload_landmarks=landmarks_to_proto(crop_landmarks),
                face=common_pb2.EncodedFace(
                    codec_id=self.codec.codec_id, codec_version=self.codec.version, data=self.codec.encode(crop)
                ),
                request_id=self._request_id,
            )
            faces.append(EdgeFace(observation, detection, crop))
        return faces
