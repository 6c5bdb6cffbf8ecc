"""YuNet (OpenCV zoo): a 75k-parameter detector with five landmarks, ~3 ms on one core."""

from __future__ import annotations

import threading

import cv2
import numpy as np

from facelink.config import DetectorConfig

from ..manifest import ModelManifest
from .base import Detection


class YuNetDetector:
    name = "yunet"

    def __init__(self, manifest: ModelManifest, config: DetectorConfig = DetectorConfig()) -> None:
        if not hasattr(cv2, "FaceDetectorYN"):
            raise RuntimeError(f"OpenCV {cv2.__version__} has no FaceDetectorYN: install opencv-python-headless 4.x")
        self.config = config
        self.manifest = manifest
        self._model = cv2.FaceDetectorYN.create(
            str(manifest.weights()), "", (320, 320), config.score_threshold, config.nms_threshold, 5000
        )
        # cv2.FaceDetectorYN holds per-call state (input size): one call at a time.
        self._lock = threading.Lock()

    def detect(self, image: np.ndarray) -> list[Detection]:
        height, width = image.shape[:2]
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        with self._lock:
            self._model.setInputSize((width, height))
            _, faces = self._model.detect(bgr)
        if faces is None:
            return []
        detections = [
            Detection(box=row[0:4].astype(np.float32), landmarks=row[4:14].reshape(5, 2).astype(np.float32), score=float(row[14]))
            for row in faces
            if min(row[2], row[3]) >= self.config.min_face_size
        ]
        detections.sort(key=lambda d: -d.score)
        return detections[: self.config.max_faces]
