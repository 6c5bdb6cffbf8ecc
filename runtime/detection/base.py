"""What every face detector returns, and how one is chosen."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Detection:
    box: np.ndarray        # (4,) x, y, width, height in image pixels
    landmarks: np.ndarray  # (5, 2) in facelink's landmark order (see runtime.alignment)
    score: float

    @property
    def area(self) -> float:
        return float(self.box[2] * self.box[3])


class FaceDetector(Protocol):
    name: str

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Faces in an HxWx3 uint8 RGB image, best score first."""
        ...


def largest(detections: list[Detection]) -> Detection | None:
    return max(detections, key=lambda d: d.area, default=None)


def detection_input(image: np.ndarray, detect_size: int) -> tuple[np.ndarray, float, float]:
    """The frame a detector sees under the input size policy, and the scale back to `image`.

    A frame whose longest side is longer than `detect_size` is scaled down to it (aspect kept,
    INTER_AREA: no aliasing at 4K -> 640); smaller frames, and `detect_size` 0, go unchanged.
    Returns (frame, sx, sy): a point (x, y) of the result is (x * sx, y * sy) in `image`.
    """
    height, width = image.shape[:2]
    longest = max(height, width)
    if detect_size <= 0 or longest <= detect_size:
        return image, 1.0, 1.0
    import cv2

    scale = detect_size / longest
    small_w, small_h = max(1, round(width * scale)), max(1, round(height * scale))
    small = cv2.resize(image, (small_w, small_h), interpolation=cv2.INTER_AREA)
    return small, width / small_w, height / small_h


def rescaled(rows: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """YuNet rows (x, y, w, h, 5 landmark x/y pairs, score) mapped back by (sx, sy): box corners
    and sizes scale as lengths, landmarks as points (the same factor: coordinates are continuous
    with pixel (0, 0)'s corner at the origin, which is how cv2.resize maps areas)."""
    if sx == 1.0 and sy == 1.0:
        return rows
    rows = rows.astype(np.float32, copy=True)
    rows[:, 0:14:2] *= np.float32(sx)
    rows[:, 1:14:2] *= np.float32(sy)
    return rows


def yunet_detections(rows: np.ndarray | None, min_face_size: int, max_faces: int) -> list[Detection]:
    """Rows of YuNet's output (cv2.FaceDetectorYN's layout) as Detections, best score first."""
    if rows is None or len(rows) == 0:
        return []
    detections = [
        Detection(box=row[0:4].astype(np.float32), landmarks=row[4:14].reshape(5, 2).astype(np.float32), score=float(row[14]))
        for row in rows
        if min(row[2], row[3]) >= min_face_size
    ]
    detections.sort(key=lambda d: -d.score)
    return detections[:max_faces]
