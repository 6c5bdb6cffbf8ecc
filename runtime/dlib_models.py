"""Locating dlib's models from the `face_recognition_models` package (PyPI, CC0).

We find the files through importlib instead of importing the package: its __init__ imports
pkg_resources, which setuptools >= 81 no longer ships.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

FACE_RECOGNITION_MODEL = "dlib_face_recognition_resnet_model_v1.dat"
SHAPE_PREDICTOR_68 = "shape_predictor_68_face_landmarks.dat"


class DlibUnavailableError(RuntimeError):
    pass


def dlib_model_path(filename: str) -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise DlibUnavailableError(
            "dlib's models are not installed: `pip install 'facelink[dlib]'` (dlib-bin, face_recognition_models)"
        )
    path = Path(spec.origin).parent / "models" / filename
    if not path.is_file():
        raise DlibUnavailableError(f"{path} is missing from the face_recognition_models package")
    return path


def import_dlib():  # noqa: ANN201 - dlib ships no type information
    try:
        import dlib
    except ImportError as error:
        raise DlibUnavailableError("dlib is not installed: `pip install 'facelink[dlib]'` (dlib-bin)") from error
    return dlib
