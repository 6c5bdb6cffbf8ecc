"""Without ../shared, a fresh machine still detects and recognises: dlib from PyPI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from facelink.runtime.detection import create_detector
from facelink.runtime.detection.dlib_hog import DlibHogDetector
from facelink.runtime.recognition import DlibRecognizer, create_recognizer

from .support import SHARED_LFW, lfw_image, read_rgb

needs_lfw_pictures = pytest.mark.skipif(not SHARED_LFW.is_dir(), reason=f"LFW pictures not present at {SHARED_LFW}")


@pytest.fixture
def no_shared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACELINK_SHARED", str(tmp_path / "empty"))


def test_auto_falls_back_to_dlib_without_the_shared_models(no_shared: None) -> None:
    assert isinstance(create_detector(), DlibHogDetector)
    recognizer = create_recognizer()
    assert isinstance(recognizer, DlibRecognizer) and recognizer.model_id == "dlib-resnet@v1"


def test_asking_for_yunet_without_its_model_says_where_it_looked(no_shared: None) -> None:
    from facelink.config import DetectorConfig
    from facelink.runtime.manifest import ManifestError

    with pytest.raises(ManifestError, match="face_detection_yunet_2026may.onnx does not exist"):
        create_detector(DetectorConfig(kind="yunet"))


@needs_lfw_pictures
def test_dlib_detects_and_recognises_real_faces(no_shared: None) -> None:
    detector, recognizer = create_detector(), create_recognizer()
    embeddings = []
    for name, index in (("Colin_Powell", 1), ("Colin_Powell", 2), ("Serena_Williams", 1)):
        image = read_rgb(lfw_image(name, index))
        faces = detector.detect(image)
        assert faces, f"dlib found no face in {name} {index}"
        left_eye, right_eye, nose, mouth_left, mouth_right = max(faces, key=lambda f: f.area).landmarks
        # facelink's landmark order: image-left before image-right, eyes above nose above mouth.
        assert left_eye[0] < right_eye[0] and mouth_left[0] < mouth_right[0]
        assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])
        embeddings.append(recognizer.embed(image, faces[0].landmarks))
    same, different = float(embeddings[0] @ embeddings[1]), float(embeddings[0] @ embeddings[2])
    assert same >= recognizer.match_threshold > different
    assert np.isclose(np.linalg.norm(embeddings[0]), 1.0, atol=1e-5)
