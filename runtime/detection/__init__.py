"""Face detectors: YuNet (default, from ../shared) and dlib's HOG (fallback from PyPI)."""

from __future__ import annotations

from facelink.config import DetectorConfig

from ..manifest import ManifestError, load_manifest
from .base import Detection, FaceDetector, largest

__all__ = ["Detection", "FaceDetector", "create_detector", "largest"]


def create_detector(config: DetectorConfig = DetectorConfig()) -> FaceDetector:
    """The configured detector; `auto` takes YuNet when its weights are present, else dlib."""
    if config.kind in ("auto", "yunet"):
        manifest = load_manifest("yunet")
        try:
            manifest.weights()
        except ManifestError:
            if config.kind == "yunet":
                raise
        else:
            from .yunet import YuNetDetector

            return YuNetDetector(manifest, config)
    from .dlib_hog import DlibHogDetector

    return DlibHogDetector(config)
