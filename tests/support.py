"""Helpers for tests that use real faces from the shared folder."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from facelink.config import shared_dir

SHARED_LFW = shared_dir() / "data" / "lfw" / "lfw-deepfunneled"
SHARED_YUNET = shared_dir() / "models" / "yunet" / "face_detection_yunet_2026may.onnx"
SHARED_MOBILEFACENET = shared_dir() / "models" / "mobilefacenet-ms1m" / "mobilefacenet.onnx"

needs_shared = pytest.mark.skipif(
    not (SHARED_LFW.is_dir() and SHARED_YUNET.is_file() and SHARED_MOBILEFACENET.is_file()),
    reason=f"needs LFW, YuNet and MobileFaceNet from the shared folder ({shared_dir()}); set FACELINK_SHARED",
)


def lfw_image(name: str, index: int = 1) -> Path:
    return SHARED_LFW / name / f"{name}_{index:04d}.jpg"


def read_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
