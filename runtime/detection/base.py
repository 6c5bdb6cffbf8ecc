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
