"""YuNet (OpenCV zoo) through OpenCV: a 75k-parameter detector with five landmarks, ~3 ms on one core.

This is the CPU path (`cv2.FaceDetectorYN`); `yunet_ort.py` runs the same ONNX file through ONNX
Runtime, which is how the detector reaches a GPU. Both detect on the frame scaled down to
`DetectorConfig.detect_size` (longest side) and map the results back.
"""

from __future__ import annotations

import threading

import cv2
import numpy as np

from facelink.config import DetectorConfig

from ..manifest import ModelManifest
from .base import Detection, detection_input, rescaled, yunet_detections


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

    def raw(self, image: np.ndarray) -> np.ndarray | None:
        """cv2.FaceDetectorYN's rows for an RGB image at its own size (no input size policy)."""
        height, width = image.shape[:2]
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        with self._lock:
            self._model.setInputSize((width, height))
            _, faces = self._model.detect(bgr)
        return faces

    def detect(self, image: np.ndarray) -> list[Detection]:
        small, sx, sy = detection_input(image, self.config.detect_size)
        faces = self.raw(small)
        if faces is None:
            return []
        return yunet_detections(rescaled(faces, sx, sy), self.config.min_face_size, self.config.max_faces)
