"""dlib's HOG detector with its 68-point shape predictor: the fallback that needs no ../shared.

Slower and less robust to pose than YuNet, but `pip install dlib-bin face_recognition_models`
is all it takes. facelink's five landmarks come from the 68 points: the centres of the two
eye contours, the nose tip, and the two outer mouth corners, which is where ArcFace-style
templates put them.
"""

from __future__ import annotations

import threading

import numpy as np

from facelink.config import DetectorConfig

from ..dlib_models import SHAPE_PREDICTOR_68, dlib_model_path, import_dlib
from .base import Detection

# iBUG 68-point indices, image-left to image-right as seen in the picture.
_LEFT_EYE = slice(36, 42)
_RIGHT_EYE = slice(42, 48)
_NOSE_TIP = 30
_MOUTH_LEFT, _MOUTH_RIGHT = 48, 54


def five_from_68(points: np.ndarray) -> np.ndarray:
    return np.stack(
        [points[_LEFT_EYE].mean(0), points[_RIGHT_EYE].mean(0), points[_NOSE_TIP], points[_MOUTH_LEFT], points[_MOUTH_RIGHT]]
    ).astype(np.float32)


class DlibHogDetector:
    name = "dlib-hog"

    def __init__(self, config: DetectorConfig = DetectorConfig(), upsample: int = 1) -> None:
        dlib = import_dlib()
        self._dlib = dlib
        self.config = config
        self.upsample = upsample
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(dlib_model_path(SHAPE_PREDICTOR_68)))
        self._lock = threading.Lock()  # dlib objects are not documented as thread-safe

    def detect(self, image: np.ndarray) -> list[Detection]:
        image = np.ascontiguousarray(image)
        with self._lock:
            rects, scores, _ = self._detector.run(image, self.upsample, 0.0)
            shapes = [self._predictor(image, rect) for rect in rects]
        detections = []
        for rect, score, shape in zip(rects, scores, shapes):
            box = np.array([rect.left(), rect.top(), rect.width(), rect.height()], dtype=np.float32)
            if min(box[2], box[3]) < self.config.min_face_size:
                continue
            points = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)
            # HOG scores are SVM margins, not probabilities: squash them to (0, 1) for a common scale.
            detections.append(Detection(box, five_from_68(points), float(1 / (1 + np.exp(-score)))))
        detections.sort(key=lambda d: -d.score)
        return detections[: self.config.max_faces]
