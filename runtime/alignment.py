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


#: How far outside the picture a landmark may lie, as a fraction of the picture's longer side: a
#: face cut by the frame edge still has its landmarks estimated a little beyond it.
LANDMARK_MARGIN = 0.1
#: Below this eye distance (px) there is no face to recognise (YuNet's smallest faces have ~8).
MIN_EYE_DISTANCE = 4.0
#: The largest root-mean-square distance (in ArcFace 112x112 template pixels, where the eyes are
#: 35.2 px apart) between five landmarks and the template after the best similarity. YuNet's
#: landmarks on 1,356 faces of LFW and CelebA-dev: median 3.0, 99.9th percentile 12.5, max 14.6;
#: five random points: median 20.8. Above it the points do not have a face's shape.
MAX_TEMPLATE_RESIDUAL = 18.0
#: The mouth lies below the eyes: its centre's distance from the line through the eyes, in eye
#: distances (template 1.16; YuNet on 1,574 faces of LFW and CelebA-dev: min 0.78, median 1.02).
#: Points on one line (0) are what a similarity fit alone lets through.
MIN_MOUTH_DEPTH = 0.4


def check_face_geometry(landmarks: np.ndarray, image_shape: tuple[int, ...]) -> np.ndarray:
    """Landmarks that a client sent, checked to describe a face in this picture.

    Refuses (ValueError naming the problem) points far outside the picture, eyes closer than
    MIN_EYE_DISTANCE, and five points that no similarity brings near the face template
    (collinear, coincident or scrambled): a template computed from them would match junk.
    """
    points = check_landmarks(landmarks)
    height, width = image_shape[:2]
    margin = LANDMARK_MARGIN * max(height, width)
    outside = (points[:, 0] < -margin) | (points[:, 0] > width + margin) | (points[:, 1] < -margin) | (points[:, 1] > height + margin)
    if outside.any():
        index = int(np.flatnonzero(outside)[0])
        x, y = points[index]
        raise ValueError(f"landmark {index} at ({x:.1f}, {y:.1f}) lies outside the {width}x{height} picture")
    eyes = float(np.linalg.norm(points[1] - points[0]))
    if eyes < MIN_EYE_DISTANCE:
        raise ValueError(f"the eyes are {eyes:.1f} px apart, under {MIN_EYE_DISTANCE:.0f} px: no face to recognise")
    eye_line = points[1] - points[0]
    mouth = (points[3] + points[4]) / 2 - points[0]
    depth = abs(float(eye_line[0] * mouth[1] - eye_line[1] * mouth[0])) / eyes**2
    if depth < MIN_MOUTH_DEPTH:
        raise ValueError(f"the mouth is {depth:.2f} eye distances from the eye line, under {MIN_MOUTH_DEPTH}: "
                         "the five landmarks do not have a face's shape")
    matrix = similarity_transform(points, ARCFACE_112)
    residual = float(np.sqrt(((transform_points(matrix, points) - ARCFACE_112) ** 2).sum(axis=1).mean()))
    if residual > MAX_TEMPLATE_RESIDUAL:
        raise ValueError(f"the five landmarks do not have a face's shape (off the template by {residual:.1f} px RMS, "
                         f"at most {MAX_TEMPLATE_RESIDUAL:.0f})")
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
