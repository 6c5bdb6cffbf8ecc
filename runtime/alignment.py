"""Five-point similarity alignment.

Every recogniser is trained on faces warped so that five landmarks land on a fixed template
(the ArcFace 112x112 one for most modern models). We estimate the similarity transform
(rotation, uniform scale, translation: 4 degrees of freedom, no shear, so faces keep their
proportions) that best maps the detected landmarks onto the template in the least-squares
sense (Umeyama, 1991), and warp with it.

Landmark order everywhere in facelink: image-left eye, image-right eye, nose tip,
image-left mouth corner, image-right mouth corner.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

#: The ArcFace / InsightFace template for 112x112 crops.
ARCFACE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)


@dataclass(frozen=True)
class Template:
    """Where the five landmarks go in an output crop of `size` (width, height)."""

    points: np.ndarray  # (5, 2) float32
    size: tuple[int, int]

    def __post_init__(self) -> None:
        points = np.asarray(self.points, dtype=np.float32)
        if points.shape != (5, 2) or not np.isfinite(points).all():
            raise ValueError(f"a template needs 5 finite (x, y) points, got shape {points.shape}")
        object.__setattr__(self, "points", points)

    def scaled(self, scale: float, size: tuple[int, int]) -> "Template":
        """The same face geometry scaled about the template's centre and centred in `size`."""
        centre_in = np.array(self.size, dtype=np.float32) / 2
        centre_out = np.array(size, dtype=np.float32) / 2
        return Template((self.points - centre_in) * scale + centre_out, size)


ARCFACE = Template(ARCFACE_112, (112, 112))


def canonical_template(size: int = 128, scale: float = 1.0) -> Template:
    """The template of the canonical crop the edge sends (see `config.CanonicalCrop`)."""
    return ARCFACE.scaled(scale, (size, size))


def check_landmarks(landmarks: np.ndarray) -> np.ndarray:
    points = np.asarray(landmarks, dtype=np.float32)
    if points.shape != (5, 2):
        raise ValueError(f"expected 5 landmarks as a (5, 2) array, got shape {points.shape}")
    if not np.isfinite(points).all():
        raise ValueError("landmarks contain NaN or infinity")
    return points


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 similarity matrix M minimising sum |M [src;1] - dst|^2 (Umeyama, no reflection)."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    n = src.shape[0]
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c**2).sum() / n
    if src_var < 1e-12:
        raise ValueError("degenerate landmarks: all points coincide")
    cov = dst_c.T @ src_c / n
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # forbid a reflection
        d[-1] = -1
    rotation = u @ np.diag(d) @ vt
    scale = (s * d).sum() / src_var
    matrix = np.empty((2, 3), dtype=np.float64)
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    return (points @ matrix[:, :2].T + matrix[:, 2]).astype(np.float32)


def crop_footprint(landmarks: np.ndarray, template: Template) -> tuple[float, float, float, float]:
    """The box (x0, y0, x1, y1) of the picture that `warp_face(image, landmarks, template)` samples:
    the bounds of the crop's corners mapped back into the picture."""
    matrix = similarity_transform(template.points, check_landmarks(landmarks))  # crop -> picture
    width, height = template.size
    corners = transform_points(matrix, np.array([[0, 0], [width, 0], [0, height], [width, height]], np.float64))
    (x0, y0), (x1, y1) = corners.min(axis=0), corners.max(axis=0)
    return float(x0), float(y0), float(x1), float(y1)


def warp_face(image: np.ndarray, landmarks: np.ndarray, template: Template) -> tuple[np.ndarray, np.ndarray]:
    """Warp `image` so that `landmarks` land on `template`.

    Returns the crop and the landmarks in the crop's coordinates (they are not exactly the
    template's: a similarity cannot fit five points exactly, and the residual is information
    the next warp needs).
    """
    points = check_landmarks(landmarks)
    matrix = similarity_transform(points, template.points)
    # Bilinear is what the recognisers were trained with; replicate the border so a face near
    # the frame edge does not gain a hard black edge the codec would spend bits on.
    crop = cv2.warpAffine(image, matrix, template.size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return crop, transform_points(matrix, points)
