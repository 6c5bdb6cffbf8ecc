"""How good one shot of a face is for recognition: one number in 0..1, cheap enough for every face.

The edge sends a few shots per track (edge/tracks.py) and must pick them without asking the
cloud, so it needs a score that orders shots of the *same* person the way a recogniser would:
a large, sharp, frontal, confidently detected face first. Four factors, each in 0..1:

* size: the distance between the eyes in the source frame, over the eye distance of the
  canonical crop's template (38.3 px at the default 128 px crop). 1 means the crop is made
  without upsampling; a face half that size is upsampled 2x and has lost detail for good.
* sharpness: the variance of the Laplacian of the aligned crop's grey levels, over the face's
  central region only (the background's texture says nothing about the face), mapped through
  ``v / (v + SHARPNESS_HALF)``: 0.5 at SHARPNESS_HALF, saturating for very sharp crops. Measured
  on the aligned crop, so a small face (upsampled to the crop) scores low here too, as it should.
* pose: from the five landmarks. Yaw: the nose's horizontal offset from the eyes' midpoint,
  in eye distances, measured along the eye line (so roll does not pass for yaw); about 0 for
  a frontal face and 0.5 or more near profile. Roll: the eye line's angle. Alignment undoes
  roll, so it counts little; yaw it cannot undo.
* detector: the detector's confidence, rescaled from [DETECTOR_FLOOR, 1] to [0, 1].

They combine as a weighted geometric mean, ``prod(f_i ** w_i)`` with the weights summing to 1:
one factor near 0 (a profile, a blur) pulls the whole score down, which an average would not
do. The score ranks shots; its absolute value only matters for ``--min-quality``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from facelink.runtime.alignment import Template

__all__ = ["FaceQuality", "WEIGHTS", "face_quality", "pose_angles", "sharpness"]

#: Laplacian variance that scores 0.5 (measured on 128 px canonical crops of LFW: sharp
#: pictures give 300-1500, a 5 px Gaussian blur of them 20-60).
SHARPNESS_HALF = 150.0
#: Detector scores at or below this map to 0 (YuNet keeps faces from 0.6 by default).
DETECTOR_FLOOR = 0.5
#: |yaw| (nose offset in eye distances) at which the pose factor reaches 0.
YAW_LIMIT = 0.6
#: |roll| in degrees at which the roll part of the pose factor reaches its floor.
ROLL_LIMIT_DEG = 60.0
#: Weights of the geometric mean: size and sharpness decide most of what a recogniser sees.
WEIGHTS = {"size": 0.3, "sharpness": 0.3, "pose": 0.3, "detector": 0.1}
_EPS = 1e-3  # a factor of exactly 0 would make the product 0 whatever the others say


@dataclass(frozen=True)
class FaceQuality:
    """The four factors and their combination, all in 0..1; ``yaw`` and ``roll_deg`` raw, for logs."""

    score: float
    size: float
    sharpness: float
    pose: float
    detector: float
    yaw: float
    roll_deg: float


def pose_angles(landmarks: np.ndarray) -> tuple[float, float, float]:
    """(yaw, roll in degrees, eye distance in px) from five landmarks in facelink's order:
    eye, eye, nose, mouth corner, mouth corner (image left to right for a frontal face)."""
    points = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    eye_a, eye_b, nose = points[0], points[1], points[2]
    axis = eye_b - eye_a
    eye_distance = float(np.hypot(*axis))
    if eye_distance < 1e-6:
        return math.inf, 0.0, 0.0
    unit = axis / eye_distance
    roll = math.degrees(math.atan2(unit[1], unit[0]))
    # The nose tip stands out of the face, so turning the head moves it sideways more than the
    # eyes and mouth: its offset from the face's midline (halfway between the eyes' and the
    # mouth's midpoints), along the eye line and in eye distances, is the yaw estimate.
    midline = ((eye_a + eye_b) / 2 + (points[3] + points[4]) / 2) / 2
    yaw = float(np.dot(nose - midline, unit)) / eye_distance
    return yaw, roll, eye_distance


def sharpness(crop: np.ndarray) -> float:
    """Variance of the Laplacian over the central 60% of an aligned crop (RGB or grey uint8)."""
    grey = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY) if crop.ndim == 3 else crop
    h, w = grey.shape[:2]
    centre = grey[int(h * 0.2): int(h * 0.8), int(w * 0.2): int(w * 0.8)]
    return float(cv2.Laplacian(centre, cv2.CV_64F).var())


def _template_eye_distance(template: Template) -> float:
    return float(np.hypot(*(template.points[1] - template.points[0])))


def face_quality(
    landmarks: np.ndarray, detector_score: float, crop: np.ndarray, template: Template
) -> FaceQuality:
    """The quality of one face: its landmarks and detector score in the source frame, and its
    crop aligned to `template` (the canonical crop the edge would send)."""
    yaw, roll, eye_distance = pose_angles(landmarks)
    size = min(1.0, eye_distance / _template_eye_distance(template))
    variance = sharpness(crop)
    sharp = variance / (variance + SHARPNESS_HALF)
    yaw_factor = max(0.0, 1.0 - abs(yaw) / YAW_LIMIT) if math.isfinite(yaw) else 0.0
    roll_factor = 1.0 - 0.5 * min(1.0, abs(roll) / ROLL_LIMIT_DEG)  # alignment fixes most of it
    pose = yaw_factor * roll_factor
    detector = min(1.0, max(0.0, (float(detector_score) - DETECTOR_FLOOR) / (1.0 - DETECTOR_FLOOR)))
    factors = {"size": size, "sharpness": sharp, "pose": pose, "detector": detector}
    score = math.exp(sum(w * math.log(max(factors[k], _EPS)) for k, w in WEIGHTS.items()))
    return FaceQuality(
        score=float(min(1.0, max(0.0, score))), size=size, sharpness=sharp, pose=pose, detector=detector,
        yaw=yaw if math.isfinite(yaw) else 1.0, roll_deg=roll,
    )
