"""Five-point similarity alignment."""

from __future__ import annotations

import numpy as np
import pytest

from facelink.runtime.alignment import (
    ARCFACE,
    ARCFACE_112,
    Template,
    canonical_template,
    similarity_transform,
    transform_points,
    warp_face,
)


def _similarity(angle_deg: float, scale: float, tx: float, ty: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    rotation = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return np.hstack([rotation, [[tx], [ty]]])


def test_recovers_an_exact_similarity() -> None:
    truth = _similarity(17.0, 1.7, 30.0, -12.0)
    src = transform_points(np.linalg.inv(np.vstack([truth, [0, 0, 1]]))[:2], ARCFACE_112)
    estimated = similarity_transform(src, ARCFACE_112)
    np.testing.assert_allclose(transform_points(estimated, src), ARCFACE_112, atol=1e-3)
    np.testing.assert_allclose(estimated, truth, atol=1e-4)


def test_never_reflects() -> None:
    mirrored = ARCFACE_112 * np.array([-1.0, 1.0], dtype=np.float32)
    matrix = similarity_transform(mirrored, ARCFACE_112)
    assert np.linalg.det(matrix[:, :2]) > 0  # a rotation and a scale, never a mirror


def test_warp_puts_landmarks_on_the_template() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)
    landmarks = transform_points(_similarity(-8.0, 2.2, 120.0, 60.0), ARCFACE_112)
    crop, crop_landmarks = warp_face(image, landmarks, ARCFACE)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    np.testing.assert_allclose(crop_landmarks, ARCFACE_112, atol=1e-2)


def test_canonical_crop_holds_the_arcface_crop_with_a_border() -> None:
    template = canonical_template(128, 1.0)
    assert template.size == (128, 128)
    np.testing.assert_allclose(template.points - ARCFACE_112, 8.0, atol=1e-5)  # an 8-px border all round
    bigger = canonical_template(256, 2.0)
    np.testing.assert_allclose(bigger.points, template.points * 2, atol=1e-4)


def test_rewarp_from_canonical_crop_matches_direct_warp() -> None:
    """What the cloud does (warp the edge's crop again) gives nearly what a direct warp gives."""
    rng = np.random.default_rng(1)
    image = cv2_blur(rng.integers(0, 255, (250, 250, 3), dtype=np.uint8))
    landmarks = transform_points(_similarity(5.0, 1.4, 40.0, 30.0), ARCFACE_112)
    direct, _ = warp_face(image, landmarks, ARCFACE)
    crop, crop_landmarks = warp_face(image, landmarks, canonical_template())
    rewarped, _ = warp_face(crop, crop_landmarks, ARCFACE)
    assert np.abs(direct.astype(int) - rewarped.astype(int)).mean() < 6.0


def cv2_blur(image: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(image, (9, 9), 3)


@pytest.mark.parametrize(
    "landmarks, message",
    [
        (np.zeros((4, 2)), "5 landmarks"),
        (np.full((5, 2), np.nan), "NaN"),
        (np.ones((5, 2)), "degenerate"),
    ],
)
def test_bad_landmarks_are_refused(landmarks: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        warp_face(np.zeros((50, 50, 3), np.uint8), landmarks, ARCFACE)


def test_template_validates_its_points() -> None:
    with pytest.raises(ValueError, match="5 finite"):
        Template(np.zeros((3, 2)), (10, 10))


def test_crop_footprint_is_the_region_warp_face_samples() -> None:
    from facelink.runtime.alignment import ARCFACE, crop_footprint

    assert crop_footprint(ARCFACE.points, ARCFACE) == pytest.approx((0, 0, 112, 112), abs=1e-3)
    # Landmarks at twice the template's scale, shifted: the crop samples twice the area, shifted.
    assert crop_footprint(ARCFACE.points * 2 + 10, ARCFACE) == pytest.approx((10, 10, 234, 234), abs=1e-3)
    # Rotated 90 degrees about the crop's centre: the bounds of the rotated square are the square.
    centre = np.array([56, 56], np.float32)
    rotated = (ARCFACE.points - centre) @ np.array([[0, 1], [-1, 0]], np.float32) + centre
    assert crop_footprint(rotated, ARCFACE) == pytest.approx((0, 0, 112, 112), abs=1e-2)
