"""The face-finding step the face benchmarks share: detect, keep the central face, fingerprint.

`verification` and `rate_accuracy` both find the face a picture is labelled with the same way
(the detector's face nearest the picture centre: LFW and CelebA portraits are centred on their
subject), and both key their caches on everything upstream of the recogniser, so the
detector's identity lives here once.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from facelink.config import DetectorConfig


def central_landmarks(detector, image: np.ndarray) -> np.ndarray | None:  # noqa: ANN001
    """The five landmarks of the detected face nearest the centre of `image`, or None if none."""
    from facelink.edge.pipeline import select_faces

    faces = select_faces(detector.detect(image), "central", image.shape)
    return faces[0].landmarks if faces else None


def detector_fingerprint(detector, config: DetectorConfig) -> dict[str, Any]:  # noqa: ANN001
    """What identifies a detector's output: its kind, model, weights and settings."""
    manifest = getattr(detector, "manifest", None)
    return {
        "detector": getattr(detector, "name", type(detector).__name__),
        "detector_model": getattr(manifest, "model_id", None),
        "detector_sha256": getattr(manifest, "sha256", None),
        "detector_config": config.model_dump(),
        "selection": "central",
    }
